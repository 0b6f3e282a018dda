"""The configurations the documentation's table audits, their configs, and the table itself (Markdown).

``python -m rlloss.audit table`` prints it; ``--update docs/audit.md`` rewrites the table between
the page's ``<!-- audit-table:begin -->`` and ``<!-- audit-table:end -->`` markers. Every row is
measured when the command runs, on the installed TRL and verl.
"""

from __future__ import annotations

import datetime
import importlib.metadata as metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .result import Audit, small

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's loss types
# (gradient_accumulation_steps, steps_per_generation, processes): equal, generation spanning two steps,
# a step spanning two generations, two processes
TRL_SHAPES = ((2, 2, 1), (2, 4, 1), (4, 2, 1), (2, 2, 2))
VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BEGIN, END = "<!-- audit-table:begin -->", "<!-- audit-table:end -->"


@dataclass(frozen=True)
class TrlCase:
    """One TRL configuration: ``GRPOConfig(loss_type=..., gradient_accumulation_steps=..., ...)``."""

    loss_type: str
    accumulation: int
    per_generation: int
    processes: int = 1
    options: dict[str, Any] = field(default_factory=dict)

    def config(self, output_dir: str = "rlloss-audit") -> Any:
        """The ``trl.GRPOConfig`` (CPU, no reporting; ``output_dir`` is never written by the audit)."""
        import trl

        return trl.GRPOConfig(output_dir=output_dir, loss_type=self.loss_type,
                              gradient_accumulation_steps=self.accumulation,
                              steps_per_generation=self.per_generation, use_cpu=True, bf16=False, report_to=[],
                              **self.options)

    def describe(self) -> str:
        """The table's configuration cell."""
        options = "".join(f", {k}={v}" for k, v in self.options.items())
        return (f"`{self.loss_type}`{options}, GA={self.accumulation}, spg={self.per_generation}, "
                f"P={self.processes}")

    def audit(self) -> Audit:
        """``audit_trl`` of this configuration."""
        from .trl import audit_trl

        return audit_trl(self.config(), num_processes=self.processes)


@dataclass(frozen=True)
class VerlCase:
    """One verl configuration: an ``ActorConfig`` with ``loss_agg_mode`` and ``policy_loss.loss_mode``."""

    loss_agg_mode: str
    loss_mode: str = "vanilla"
    dynamic_bsz: bool = True
    loss_scale_factor: int | None = None

    def config(self) -> Any:
        """The ``ActorConfig`` (with ``use_dynamic_bsz=False``, a micro-batch size the audit does not read)."""
        from verl.workers.config import ActorConfig, PolicyLossConfig

        micro = {} if self.dynamic_bsz else {"ppo_micro_batch_size_per_gpu": 4}
        return ActorConfig(strategy="fsdp", rollout_n=1, use_dynamic_bsz=self.dynamic_bsz,
                           loss_agg_mode=self.loss_agg_mode, loss_scale_factor=self.loss_scale_factor,
                           policy_loss=PolicyLossConfig(loss_mode=self.loss_mode), **micro)

    def describe(self) -> str:
        """The table's configuration cell."""
        extra = "" if self.loss_scale_factor is None else f", loss_scale_factor={self.loss_scale_factor}"
        batching = "dynamic bsz" if self.dynamic_bsz else "fixed bsz"
        return f"`{self.loss_mode}`, `{self.loss_agg_mode}`{extra}, {batching}"

    def audit(self) -> Audit:
        """``audit_verl`` of this configuration (2 micro-batches x 2 ranks, responses of 64)."""
        from .verl import audit_verl

        return audit_verl(self.config())


def trl_cases() -> list[TrlCase]:
    """Every TRL 1.16 loss_type in every shape of ``TRL_SHAPES``, and CISPO at its recommended cap."""
    cases = [TrlCase(lt, ga, spg, p) for lt in TRL_LOSS_TYPES for ga, spg, p in TRL_SHAPES]
    return cases + [TrlCase("cispo", 2, 2, 1, {"epsilon_high": 5.0})]


def verl_cases() -> list[VerlCase]:
    """Every loss_agg_mode with verl's vanilla loss, a set loss_scale_factor, and the losses that override the mode."""
    cases = [VerlCase(mode) for mode in VERL_MODES]
    return cases + [VerlCase("seq-mean-token-sum-norm", loss_scale_factor=4096),
                    VerlCase("token-mean", loss_mode="sapo"),
                    VerlCase("token-mean", loss_mode="geo_mean"),
                    VerlCase("token-mean", loss_mode="geo_mean", dynamic_bsz=False)]


def _num(x: float) -> str:
    return f"{x:.4g}"


def row(case: TrlCase | VerlCase, audit: Audit) -> str:
    """One Markdown row: configuration, aggregation, scale, residual, split-invariance."""
    if audit.aggregation is not None:
        matched, scale = f"`{audit.aggregation}`", _num(audit.scale)
    else:
        matched, scale = f"none (nearest `{audit.nearest}`)", f"({_num(audit.candidates[audit.nearest][0])})"
    invariant = "yes" if audit.split_invariant else f"**no** ({_num(audit.split_error)})"
    scale = scale if audit.aggregation is None or abs(audit.scale - 1) <= 1e-6 else f"**{scale}**"
    return f"| {case.describe()} | {matched} | {scale} | {small(audit.residual)} | {invariant} |"


def versions() -> str:
    """The installed versions of the trainers, transformers and torch, as the table's header says them."""
    names = ("trl", "transformers", "verl", "torch")
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


def table(date: datetime.date | None = None) -> str:
    """The Markdown table: every case audited now, with the date and the installed versions."""
    date = date or datetime.date.today()
    header = ["| configuration | aggregation | scale | residual | split-invariant |", "|---|---|---|---|---|"]
    lines = [f"Measured {date.isoformat()} with {versions()}, by `python -m rlloss.audit table` "
             "(GA: gradient_accumulation_steps, spg: steps_per_generation, P: processes; verl: 2 micro-batches "
             "x 2 ranks, responses padded to 64; split-invariant: in parentheses, the largest change).", "",
             "TRL's `GRPOTrainer`, by `loss_type`:", "", *header]
    lines += [row(case, case.audit()) for case in trl_cases()]
    lines += ["", "verl's `ppo_loss`, by `loss_mode` and `loss_agg_mode`:", "", *header]
    lines += [row(case, case.audit()) for case in verl_cases()]
    return "\n".join(lines)


def update(path: Path, text: str) -> None:
    """Replace what lies between the page's table markers with ``text``."""
    page = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(page):
        raise ValueError(f"{path} has no {BEGIN} ... {END} block to update")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", page), encoding="utf-8")
