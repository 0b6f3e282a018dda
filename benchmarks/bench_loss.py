"""Time and memory of the per-token policy loss, forward and backward, per contender.

Contenders, on the same inputs in one run:

* ``trl-inline``: TRL's GRPO loss arithmetic written inline in eager PyTorch (``loss_type`` grpo,
  dapo, dr_grpo; the formulas, not an import of TRL): the baseline most trainers run today.
* ``rlloss-torch``: ``rlloss.policy_loss(backend="torch")``, the eager reference.
* ``rlloss-compile``: the same reference under ``torch.compile``.
* ``rlloss-triton``: the fused kernels, on a CUDA device only (skipped on the CPU with the reason
  printed: interpreter timings measure Python, not a kernel).

On the CPU, times are ``time.perf_counter`` medians after warm-up and peak extra memory comes from
the profiler's memory events (allocations minus frees during forward+backward). On a CUDA
device the same command times with CUDA events, reads ``torch.cuda.max_memory_allocated`` and
sweeps larger sizes. Results: an aligned table on stdout, ``benchmarks/results/bench-<device>.json``
(``-quick`` unless ``--full``) and a PNG plot of time against tokens.

Then the other parts of the report, each a module registered in ``PARTS``: launches and bytes
counted for forward+backward and an H100 roofline model built from them (``roofline.py``,
labelled as a model), the from-logits problem (``bench_logits.py``) and the loss from hidden
states (``bench_hidden.py``: measured on the CPU at a small size, counted and modelled at a 152k
vocabulary). The compiled machine
code of the kernels is in ``benchmarks/compile/gpu_compile.py``.

The default run is a complete picture in a few minutes on 2 cores: each recipe as published (KL
only for GRPO) at two sizes on the CPU. ``--full`` adds the other sizes and each recipe with and
without the KL term; the output says what the default left out.

Usage::

    python benchmarks/bench_loss.py            # the README's command
    python benchmarks/bench_loss.py --full     # every size, each recipe with and without KL
    python benchmarks/bench_loss.py --quick    # one small size, few repetitions
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # No GPU: the fused kernels can only be counted, in Triton's interpreter, which must be chosen
    # before triton is first imported. Their timings are not taken (they would measure Python).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_hidden  # noqa: E402
import bench_logits  # noqa: E402
import harness  # noqa: E402
import problems  # noqa: E402
import roofline  # noqa: E402
from harness import Column, Meter, Part, Run  # noqa: E402
from rlloss.recipes import DAPO, DR_GRPO, GRPO, Recipe  # noqa: E402

RECIPES: dict[str, Recipe] = {"GRPO": GRPO, "DAPO": DAPO, "Dr. GRPO": DR_GRPO}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096))
CPU_DEFAULT_SIZES = ((16, 1024), (64, 4096))
GPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096), (64, 16384), (8, 32768))
QUICK_SIZES = ((8, 256),)
KL_BETA = 0.04
BASELINE = "trl-inline"
PHASES = harness.PHASES
LossFn = harness.LossFn


@dataclasses.dataclass(frozen=True)
class Case:
    recipe: str
    kl: bool
    dtype: str
    b: int
    t: int


@dataclasses.dataclass(frozen=True)
class Row(Case):
    contender: str
    ms: dict[str, float]
    peak_extra_bytes: int

    @property
    def tokens(self) -> int:
        return self.b * self.t


def cases(sizes: tuple[tuple[int, int], ...], dtypes: list[str], full: bool = True) -> list[Case]:
    """Every recipe in every dtype and size; with and without the KL term when ``full``, else as
    published (KL for GRPO only)."""
    return [Case(r, kl, d, b, t) for d in dtypes for (b, t) in sizes for r in RECIPES for kl in (False, True)
            if full or kl == (RECIPES[r].beta != 0)]


def build(name: str, recipe_name: str, kl: bool, inputs: dict[str, torch.Tensor], *, compile: bool = True) -> LossFn:
    """The loss of contender ``name`` as a function of ``logp``; ``compile=False`` runs the compile
    contender's computation uncompiled (what the tests check: compiling takes minutes on 2 cores)."""
    recipe, beta = RECIPES[recipe_name], KL_BETA if kl else 0.0
    tensors = (inputs["old_logp"], inputs["adv"], inputs["mask"], inputs["ref_logp"])
    if name == BASELINE:
        return problems.trl_loss(*tensors, recipe, beta)
    if name in ("rlloss-torch", "rlloss-triton"):
        return problems.rlloss_loss(*tensors, recipe, "torch" if name == "rlloss-torch" else "triton", beta)
    if name == "rlloss-compile":
        kw = problems.loss_options(recipe, inputs["logp"].shape[1], beta)
        if kl:
            kw["ref_logp"] = inputs["ref_logp"]
        args = problems.reference_args(kw)
        step = harness.compiled(problems.policy_reference()) if compile else problems.policy_reference()
        return lambda logp: step(logp, inputs["old_logp"], inputs["adv"], inputs["mask"], *args).loss
    raise ValueError(f"unknown contender {name!r}")


def contenders(with_triton: bool, with_compile: bool) -> list[str]:
    return [BASELINE, "rlloss-torch"] + ["rlloss-compile"] * with_compile + ["rlloss-triton"] * with_triton


def sweep(names: list[str], todo: list[Case], device: torch.device, meter: Meter, progress: bool = True) -> list[Row]:
    bench = harness.Bench(
        inputs=lambda c: problems.loss_inputs(c.b, c.t, DTYPES[c.dtype], device),
        build=lambda name, c, inputs: build(name, c.recipe, c.kl, inputs),
        leaf="logp", describe=lambda c: f"{c.recipe} {c.dtype} {c.b}x{c.t}")
    return [Row(**dataclasses.asdict(c), contender=n, ms=ms, peak_extra_bytes=p)
            for c, n, ms, p in harness.sweep(bench, todo, names, meter, progress)]


def table(rows: list[Row], names: list[str]) -> str:
    """One line per case and contender; ``x base`` is the baseline's fwd+bwd time over this one's."""
    base = {(r.recipe, r.kl, r.dtype, r.b, r.t): r.ms["fwd+bwd"] for r in rows if r.contender == BASELINE}
    columns = [Column("recipe", "<9"), Column("KL", "<4"), Column("dtype", "<6"), Column("B x T", ">11"),
               Column("contender", ">16"), Column("fwd ms", ">10.3f"), Column("bwd ms", ">10.3f"),
               Column("f+b ms", ">10.3f"), Column("x base", ">8.2f"), Column("peak MiB", ">10.2f")]
    order = {n: i for i, n in enumerate(names)}
    body = [(r.recipe, "yes" if r.kl else "no", r.dtype, f"{r.b}x{r.t}", r.contender, r.ms["fwd"], r.ms["bwd"],
             r.ms["fwd+bwd"], base[(r.recipe, r.kl, r.dtype, r.b, r.t)] / r.ms["fwd+bwd"], r.peak_extra_bytes / 2**20)
            for r in sorted(rows, key=lambda r: (r.dtype, r.recipe, r.kl, r.tokens, order[r.contender]))]
    return harness.fixed_table(columns, body)


def plot(rows: list[Row], names: list[str], path: Path, title: str) -> bool:
    """fwd+bwd time against tokens, one line per contender, a panel per dtype and recipe as published."""
    def panel(dtype: str, recipe: str) -> harness.Panel:
        kl = RECIPES[recipe].beta != 0  # the recipe as published: KL for GRPO only
        lines = {n: [(r.tokens, r.ms["fwd+bwd"]) for r in rows if (r.contender, r.dtype, r.recipe, r.kl)
                     == (n, dtype, recipe, kl)] for n in names}
        return f"{recipe} {'+KL ' if kl else ''}{dtype}", lines

    grid = [[panel(d, r) for r in RECIPES] for d in sorted({r.dtype for r in rows})]
    return harness.plot_grid(grid, path, title, "tokens (B x T)", "fwd+bwd ms")


def run_loss(run: Run, dtypes: list[str]) -> tuple[dict[str, Any], list[Row], list[str]]:
    """The timed policy loss: the sweep and its table."""
    with_triton = run.on_gpu and harness.triton_version() is not None
    names = contenders(with_triton, with_compile=run.compile)
    if not with_triton:
        why = "triton does not import" if run.on_gpu else "no CUDA device, and interpreter timings would measure " \
            "Python, not a kernel"
        print(f"rlloss-triton: skipped: {why}")
        run.skipped.append(f"rlloss-triton ({why})")
    if not run.compile:
        run.skip("rlloss-compile (--no-compile)")
    sizes = QUICK_SIZES if run.quick else GPU_SIZES if run.on_gpu else CPU_SIZES if run.full else CPU_DEFAULT_SIZES
    if run.quick:
        run.skip(f"policy loss: every size but {QUICK_SIZES[0][0]}x{QUICK_SIZES[0][1]} (--quick)")
    if not run.full:
        left = [f"{b}x{t}" for b, t in (GPU_SIZES if run.on_gpu else CPU_SIZES) if (b, t) not in sizes]
        run.skip("policy loss: " + (f"sizes {', '.join(left)} and " if left and not run.quick else "")
                 + "each recipe with its KL term switched the other way (--full runs them)")
    rows = sweep(names, cases(sizes, dtypes, run.full), run.device, run.meter, run.progress)
    m = run.meter
    print(f"\nforward / backward / forward+backward medians of {m.reps} runs after {m.warmup} warm-up; "
          f"x base = {BASELINE} fwd+bwd time / contender's; peak MiB = extra memory of one fwd+bwd; {m.clock.label}")
    print(table(rows, names))
    record = {"reps": m.reps, "warmup": m.warmup, "rows": [dataclasses.asdict(r) | {"tokens": r.tokens} for r in rows]}
    return record, rows, names


# The report's other parts, in order: each prints its section and returns its part of the JSON record.
PARTS: tuple[Part, ...] = (
    roofline.PART,
    bench_logits.PART,
    bench_hidden.PART,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every size, each recipe with and without KL (slow)")
    parser.add_argument("--quick", action="store_true", help="one small size, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per phase (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (its compile takes minutes on 2 cores)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-progress", action="store_true")
    for part in PARTS:
        parser.add_argument(f"--skip-{part.flag}", action="store_true", help=part.help)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (3 if args.quick else 20 if device.type == "cuda" else 7)
    run = Run(device, Meter.for_device(device, reps, args.warmup), full=args.full and not args.quick,
              quick=args.quick, compile=not args.no_compile, model=not getattr(args, "skip_model", False),
              progress=not args.no_progress)
    env = harness.environment(device, run.meter.clock.label)
    print(f"rlloss benchmark: {env['kind']}; device {env['device']}; torch {env['torch']}; triton {env['triton']}; "
          f"{env['threads']} threads; {env['cpu_count']} cores; {env['date']}")

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    record, rows, names = run_loss(run, dtypes)
    record = {"environment": env, "full": run.full, **record}
    seconds = {"policy loss": time.perf_counter() - started}
    for part in PARTS:
        if getattr(args, f"skip_{part.flag}"):
            run.skip(f"{part.name} (--skip-{part.flag})")
            continue
        part_started = time.perf_counter()
        record |= part.run(run)
        seconds[part.name] = time.perf_counter() - part_started

    tag = ("cuda" if run.on_gpu else "cpu") + ("" if run.full else "-quick")  # only a full run is the record
    json_path, png = args.out_dir / f"bench-{tag}.json", args.out_dir / f"bench-{tag}.png"
    record["skipped"] = run.skipped
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["seconds_per_part"] = {k: round(v, 1) for k, v in seconds.items()}
    harness.write_json(json_path, record)
    drew = plot(rows, names, png, f"rlloss policy loss, fwd+bwd, {env['kind']}, {env['device']}, {env['date'][:10]}")
    print(f"\nwrote {json_path}" + (f" and {png}" if drew else " (no plot: matplotlib missing)"))
    if run.skipped:
        print("this run left out: " + "; ".join(run.skipped))
    print(f"took {record['seconds']:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
