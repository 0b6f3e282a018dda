"""``python -m rlloss.audit``: audit a TRL or verl configuration from the command line.

::

    python -m rlloss.audit trl --loss-type dapo --gradient-accumulation-steps 4 --steps-per-generation 8
    python -m rlloss.audit verl --loss-agg-mode seq-mean-token-sum-norm --micro-batches 4 --dp-size 2
    python -m rlloss.audit table --update docs/audit.md

``trl`` and ``verl`` print the report and write the plot (``--plot PATH``, ``--plot ''`` for none);
``table`` audits every configuration of the documentation's table and prints it as Markdown.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .result import Audit
from .table import TRL_LOSS_TYPES, VERL_MODES, TrlCase, VerlCase, table, update


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlloss.audit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    trl = sub.add_parser("trl", help="TRL's GRPOTrainer for a GRPOConfig")
    trl.add_argument("--loss-type", default="dapo", choices=TRL_LOSS_TYPES)
    trl.add_argument("--gradient-accumulation-steps", type=int, default=1)
    trl.add_argument("--steps-per-generation", type=int, default=None,
                     help="default: gradient_accumulation_steps, as TRL")
    trl.add_argument("--processes", type=int, default=1, help="data-parallel processes (emulated)")
    trl.add_argument("--epsilon", type=float, default=None)
    trl.add_argument("--epsilon-high", type=float, default=None)
    trl.add_argument("--beta", type=float, default=None)
    trl.add_argument("--max-completion-length", type=int, default=None)
    trl.add_argument("--importance-sampling-level", choices=("token", "sequence"), default=None)
    trl.add_argument("--trainer", choices=("trl", "rlloss"), default="trl",
                     help="trl.GRPOTrainer, or rlloss.integrations.trl.GRPOTrainer")
    trl.add_argument("--plot", default=None, help="PNG path (default audit-trl-<loss type>.png; '' for none)")
    trl.add_argument("--seed", type=int, default=0)

    verl = sub.add_parser("verl", help="verl's ppo_loss for an ActorConfig")
    verl.add_argument("--loss-agg-mode", default="token-mean", choices=VERL_MODES)
    verl.add_argument("--loss-mode", default="vanilla", help="policy_loss.loss_mode (verl's registry)")
    verl.add_argument("--loss-scale-factor", type=int, default=None)
    verl.add_argument("--fixed-micro-batch-size", action="store_true",
                      help="use_dynamic_bsz=False: micro-batches of equal row counts")
    verl.add_argument("--micro-batches", type=int, default=2)
    verl.add_argument("--dp-size", type=int, default=2)
    verl.add_argument("--response-length", type=int, default=64)
    verl.add_argument("--plot", default=None, help="PNG path (default audit-verl-<mode>.png; '' for none)")
    verl.add_argument("--seed", type=int, default=0)

    tab = sub.add_parser("table", help="audit every configuration of docs/audit.md's table; print it")
    tab.add_argument("--update", type=Path, default=None, help="rewrite the table block of this Markdown page")
    return parser


def _trl(args: argparse.Namespace) -> tuple[Audit, str]:
    from .trl import audit_trl

    options = {name: value for name, value in (
        ("epsilon", args.epsilon), ("epsilon_high", args.epsilon_high), ("beta", args.beta),
        ("max_completion_length", args.max_completion_length),
        ("importance_sampling_level", args.importance_sampling_level)) if value is not None}
    spg = args.steps_per_generation or args.gradient_accumulation_steps
    case = TrlCase(args.loss_type, args.gradient_accumulation_steps, spg, args.processes, options)
    trainer_cls = None
    if args.trainer == "rlloss":
        from rlloss.integrations.trl import GRPOTrainer as trainer_cls
    audit = audit_trl(case.config(), num_processes=args.processes, trainer_cls=trainer_cls, seed=args.seed)
    return audit, f"audit-trl-{args.loss_type}.png"


def _verl(args: argparse.Namespace) -> tuple[Audit, str]:
    from .verl import audit_verl

    if args.loss_mode.startswith("rlloss_"):
        import rlloss.integrations.verl  # noqa: F401  -- registers the rlloss_* losses
    case = VerlCase(args.loss_agg_mode, args.loss_mode, not args.fixed_micro_batch_size, args.loss_scale_factor)
    audit = audit_verl(case.config(), micro_batches=args.micro_batches, dp_size=args.dp_size,
                       response_length=args.response_length, seed=args.seed)
    return audit, f"audit-verl-{args.loss_agg_mode}.png"


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``argv`` as ``sys.argv[1:]``); returns the exit status."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainers' deprecation notices are not the audit's output
        if args.command == "table":
            text = table()
            if args.update is not None:
                update(args.update, text)
            print(text)
            print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            return 0
        audit, default_plot = (_trl if args.command == "trl" else _verl)(args)
    print(audit.report())
    plot = default_plot if args.plot is None else args.plot
    if plot:
        print(f"plot: {audit.plot(plot)}")
    print(f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
