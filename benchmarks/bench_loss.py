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
and a PNG plot of time against tokens.

Then two sections that need no GPU: launches and bytes counted for forward+backward
(``benchmarks/traffic.py``), and an H100 roofline model built from those counts, labelled as a
model. The compiled machine code of the kernels is in ``benchmarks/gpu_compile.py``.

Usage::

    python benchmarks/bench_loss.py            # the README's command
    python benchmarks/bench_loss.py --quick    # one small size, few repetitions
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    # No GPU: the fused kernels can only be counted, in Triton's interpreter, which must be chosen
    # before triton is first imported. Their timings are not taken (they would measure Python).
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import rlloss  # noqa: E402
from rlloss._dispatch import triton_available  # noqa: E402
from rlloss.recipes import DAPO, DR_GRPO, GRPO, Recipe  # noqa: E402

RECIPES: dict[str, tuple[Recipe, str]] = {"GRPO": (GRPO, "grpo"), "DAPO": (DAPO, "dapo"), "Dr. GRPO": (DR_GRPO, "dr_grpo")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096))
GPU_SIZES = ((8, 512), (16, 1024), (32, 2048), (64, 4096), (64, 16384), (8, 32768))
QUICK_SIZES = ((8, 256),)
KL_BETA = 0.04
BASELINE = "trl-inline"
PHASES = ("fwd", "bwd", "fwd+bwd")


# --- inputs and contenders ---------------------------------------------------------------------

def make_inputs(b: int, t: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic rollout: right-padded completions, per-sequence advantages, small policy drift."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 4
    logp = old + 0.05 * torch.randn(b, t, generator=gen)
    ref = old + 0.05 * torch.randn(b, t, generator=gen)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    return {
        "logp": logp.to(device, dtype),
        "old_logp": old.to(device, dtype),
        "ref_logp": ref.to(device, dtype),
        "adv": torch.randn(b, generator=gen).to(device),
        "mask": (torch.arange(t)[None, :] < lengths[:, None]).to(device),
    }


LossFn = Callable[[torch.Tensor], torch.Tensor]  # logp (a leaf) -> scalar loss


def rlloss_fn(recipe: Recipe, kl: bool, inputs: dict[str, torch.Tensor], backend: str,
              compiled: bool = False) -> LossFn:
    kw: dict[str, Any] = {**recipe.loss_kwargs(), "beta": KL_BETA if kl else 0.0}
    if kl:
        kw["ref_logp"] = inputs["ref_logp"]
    if recipe.aggregation == "constant":
        kw["max_tokens"] = inputs["logp"].shape[1]
    if compiled:
        return compiled_reference(kw, inputs)

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return rlloss.policy_loss(logp, inputs["old_logp"], inputs["adv"], inputs["mask"], backend=backend, **kw).loss

    return loss


def reference_args(kw: dict[str, Any]) -> tuple[Any, ...]:
    """``_policy_loss_torch``'s arguments after ``(logp, old_logp, adv, mask)`` for ``policy_loss`` keywords ``kw``
    (what ``policy_loss`` itself passes once it has validated them)."""
    from rlloss.objectives import PPO

    objective = PPO(eps_low=kw["eps_low"], eps_high=kw.get("eps_high"), level=kw.get("level", "token"))
    return (objective, kw.get("ref_logp"), kw.get("beta", 0.0), "k3", False, None, 20.0, kw["aggregation"],
            kw.get("max_tokens"), None, None, 1)


def compiled_reference(kw: dict[str, Any], inputs: dict[str, torch.Tensor]) -> LossFn:
    """The reference computation (after validation, which is Python on numbers) under torch.compile."""
    from rlloss.loss import _policy_loss_torch

    args = reference_args(kw)
    step = _compiled(_policy_loss_torch)

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return step(logp, inputs["old_logp"], inputs["adv"], inputs["mask"], *args).loss

    return loss


_COMPILED: dict[Any, Any] = {}


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One torch.compile wrapper per function for the whole run, so its cache serves every case."""
    if fn not in _COMPILED:
        import torch._dynamo.config as dynamo_config

        # Each (recipe, KL, dtype) is its own graph: without a higher limit dynamo would stop compiling
        # after 8 and silently run eager code under the "compile" label; make that an error instead.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
            dynamo_config.fail_on_recompile_limit_hit = True
        _COMPILED[fn] = torch.compile(fn, fullgraph=True)
    return _COMPILED[fn]


def trl_fn(recipe: Recipe, loss_type: str, kl: bool, inputs: dict[str, torch.Tensor]) -> LossFn:
    from trl_inline import trl_grpo_loss

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return trl_grpo_loss(logp, inputs["old_logp"], inputs["adv"], inputs["mask"], loss_type=loss_type,
                        beta=KL_BETA if kl else 0.0, ref_logp=inputs["ref_logp"] if kl else None,
                        eps_low=recipe.eps_low, eps_high=recipe.eps_high, max_completion_length=inputs["logp"].shape[1])

    return loss


def contenders(device: torch.device, with_triton: bool, with_compile: bool) -> list[str]:
    names = [BASELINE, "rlloss-torch"]
    if with_compile:
        names.append("rlloss-compile")
    if with_triton:
        names.append("rlloss-triton")
    return names


def build(name: str, recipe_name: str, kl: bool, inputs: dict[str, torch.Tensor]) -> LossFn:
    recipe, loss_type = RECIPES[recipe_name]
    if name == BASELINE:
        return trl_fn(recipe, loss_type, kl, inputs)
    if name == "rlloss-torch":
        return rlloss_fn(recipe, kl, inputs, "torch")
    if name == "rlloss-compile":
        return rlloss_fn(recipe, kl, inputs, "torch", compiled=True)
    if name == "rlloss-triton":
        return rlloss_fn(recipe, kl, inputs, "triton")
    raise ValueError(f"unknown contender {name!r}")


# --- clocks and memory meters ------------------------------------------------------------------

class CpuClock:
    """Wall time of a region, in ms."""

    label = "measured on CPU (time.perf_counter)"

    def time(self, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaClock:
    """Device time of a region, in ms, from CUDA events."""

    label = "measured on CUDA (CUDA events)"

    def time(self, fn: Callable[[], Any]) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs every start and stop to file descriptor 2; keep the output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of allocations minus frees while ``fn`` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@dataclasses.dataclass
class Row:
    recipe: str
    kl: bool
    dtype: str
    b: int
    t: int
    contender: str
    ms: dict[str, float]
    peak_extra_bytes: int

    @property
    def tokens(self) -> int:
        return self.b * self.t


def measure(fn: LossFn, logp: torch.Tensor, clock: CpuClock | CudaClock, peak: Callable[[Callable[[], Any]], int],
            reps: int, warmup: int) -> tuple[dict[str, float], int]:
    """Median forward, backward and forward+backward times, and the peak extra memory of one step."""

    def forward() -> torch.Tensor:
        leaf.grad = None
        return fn(leaf)

    leaf = logp.detach().clone().requires_grad_(True)
    for _ in range(warmup):
        forward().backward()
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for _ in range(reps):
        times["fwd"].append(clock.time(forward))
        loss = forward()
        times["bwd"].append(clock.time(loss.backward))
        times["fwd+bwd"].append(clock.time(lambda: forward().backward()))
    leaf.grad = None
    return {p: statistics.median(v) for p, v in times.items()}, peak(lambda: forward().backward())


def sweep(names: list[str], sizes: tuple[tuple[int, int], ...], dtypes: list[str], device: torch.device,
          clock: CpuClock | CudaClock, peak: Callable[[Callable[[], Any]], int], reps: int, warmup: int,
          progress: bool = True) -> list[Row]:
    cases = [(r, kl, d, b, t) for d in dtypes for (b, t) in sizes for r in RECIPES for kl in (False, True)]
    total = len(cases) * len(names)
    bar = _progress(total, progress)
    rows = []
    for recipe, kl, dtype, b, t in cases:
        inputs = make_inputs(b, t, DTYPES[dtype], device)
        for name in names:
            bar.set_description(f"{name} {recipe} {dtype} {b}x{t}")
            ms, peak_bytes = measure(build(name, recipe, kl, inputs), inputs["logp"], clock, peak, reps, warmup)
            rows.append(Row(recipe, kl, dtype, b, t, name, ms, peak_bytes))
            bar.update(1)
    bar.close()
    return rows


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dev extra; the benchmark works without it
        tqdm = None
    if tqdm is None or not enabled:
        class _Silent:
            def set_description(self, _: str) -> None: ...
            def update(self, _: int) -> None: ...
            def close(self) -> None: ...
        return _Silent()
    return tqdm(total=total, unit="run", file=sys.stderr, leave=False)


# --- report ------------------------------------------------------------------------------------

def table(rows: list[Row], names: list[str]) -> str:
    """One line per case and contender; ``x base`` is the baseline's fwd+bwd time over this one's."""
    base = {(r.recipe, r.kl, r.dtype, r.b, r.t): r.ms["fwd+bwd"] for r in rows if r.contender == BASELINE}
    head = f"{'recipe':<9}{'KL':<4}{'dtype':<6}{'B x T':>11}{'contender':>16}{'fwd ms':>10}{'bwd ms':>10}" \
           f"{'f+b ms':>10}{'x base':>8}{'peak MiB':>10}"
    lines = [head, "-" * len(head)]
    order = {n: i for i, n in enumerate(names)}
    for r in sorted(rows, key=lambda r: (r.dtype, r.recipe, r.kl, r.tokens, order[r.contender])):
        speedup = base[(r.recipe, r.kl, r.dtype, r.b, r.t)] / r.ms["fwd+bwd"]
        lines.append(f"{r.recipe:<9}{'yes' if r.kl else 'no':<4}{r.dtype:<6}{f'{r.b}x{r.t}':>11}{r.contender:>16}"
                     f"{r.ms['fwd']:>10.3f}{r.ms['bwd']:>10.3f}{r.ms['fwd+bwd']:>10.3f}{speedup:>8.2f}"
                     f"{r.peak_extra_bytes / 2**20:>10.2f}")
    return "\n".join(lines)


def plot(rows: list[Row], names: list[str], path: Path, title: str) -> bool:
    """fwd+bwd time against tokens, one line per contender, a panel per dtype and recipe."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dtypes = sorted({r.dtype for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(RECIPES), figsize=(4 * len(RECIPES), 3.2 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, recipe in enumerate(RECIPES):
            ax = axes[i][j]
            kl = RECIPES[recipe][0].beta != 0  # the recipe as published: KL for GRPO only
            for name in names:
                pts = sorted((r.tokens, r.ms["fwd+bwd"]) for r in rows
                             if r.contender == name and r.dtype == dtype and r.recipe == recipe and r.kl == kl)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{recipe} {'+KL ' if kl else ''}{dtype}")
            ax.set_xlabel("tokens (B x T)")
            ax.set_ylabel("fwd+bwd ms")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def environment(device: torch.device, clock_label: str) -> dict[str, Any]:
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "kind": clock_label,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small size, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per phase (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (its compile takes minutes on 2 cores)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--skip-model", action="store_true", help="leave out the counted traffic and the roofline model")
    parser.add_argument("--skip-logits", action="store_true", help="leave out the from-logits problem")
    parser.add_argument("--skip-hidden", action="store_true", help="leave out the from-hidden-states problem")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    clock, peak = (CudaClock(), cuda_peak_bytes) if on_gpu else (CpuClock(), cpu_peak_bytes)
    sizes = QUICK_SIZES if args.quick else GPU_SIZES if on_gpu else CPU_SIZES
    reps = args.reps or (3 if args.quick else 20 if on_gpu else 7)
    with_triton = on_gpu and triton_available()
    names = contenders(device, with_triton, with_compile=not args.no_compile)
    env = environment(device, clock.label)
    print(f"rlloss benchmark: {env['kind']}; device {env['device']}; torch {env['torch']}; triton {env['triton']}; "
          f"{env['threads']} threads; {env['cpu_count']} cores; {env['date']}")
    if not with_triton:
        print("rlloss-triton: skipped: " + ("triton does not import" if on_gpu else
              "no CUDA device, and interpreter timings would measure Python, not a kernel"))

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rows = sweep(names, sizes, dtypes, device, clock, peak, reps, args.warmup, progress=not args.no_progress)
    print(f"\nforward / backward / forward+backward medians of {reps} runs after {args.warmup} warm-up; "
          f"x base = {BASELINE} fwd+bwd time / contender's; peak MiB = extra memory of one fwd+bwd; {env['kind']}")
    print(table(rows, names))

    if not args.skip_logits:
        import bench_logits

        names_l = bench_logits.contenders(on_gpu, with_compile=not args.no_compile)
        sizes_l = bench_logits.QUICK_SIZES if args.quick else bench_logits.GPU_SIZES if on_gpu else bench_logits.CPU_SIZES
        reps_l = min(reps, 3) if not on_gpu else reps
        rows_l = bench_logits.sweep(names_l, sizes_l, device, measure, clock, peak, reps_l, 1)
        print(f"\nfrom logits (bf16 logits, DAPO loss), medians of {reps_l} runs after 1 warm-up; {env['kind']}")
        print(bench_logits.table(rows_l))

    if not args.skip_hidden:
        import bench_hidden

        record_hidden = bench_hidden.report(quick=args.quick)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if on_gpu else "cpu"
    record: dict[str, Any] = {"environment": env, "reps": reps, "warmup": args.warmup,
                              "rows": [dataclasses.asdict(r) | {"tokens": r.tokens} for r in rows]}
    if not args.skip_logits:
        record["logits_rows"] = [dataclasses.asdict(r) for r in rows_l]
    if not args.skip_hidden:
        record["hidden"] = record_hidden
    if not args.skip_model:
        record["model"] = model_section(quick=args.quick)
        if not args.skip_logits:
            record["logits_model"] = bench_logits.counted_and_modelled()
    json_path = args.out_dir / f"bench-{tag}{'-quick' if args.quick else ''}.json"
    json_path.write_text(json.dumps(record, indent=1))
    png = args.out_dir / f"bench-{tag}{'-quick' if args.quick else ''}.png"
    drew = plot(rows, names, png, f"rlloss policy loss, fwd+bwd, {env['kind']}, {env['device']}, {env['date'][:10]}")
    print(f"\nwrote {json_path}" + (f" and {png}" if drew else " (no plot: matplotlib missing)"))
    return 0


def model_section(quick: bool) -> dict[str, Any]:
    """Counted traffic and the modelled H100 time; printed, and returned for the JSON record."""
    from roofline import report

    return report(quick=quick)


if __name__ == "__main__":
    raise SystemExit(main())
