"""Placeholder benchmark: forward + backward time of ``rlloss.policy_loss`` on the PyTorch backend.

Times each recipe preset (GRPO, DAPO, Dr. GRPO) through ``Recipe.loss(..., backend="torch")`` at a
few batch shapes ``B x T`` in fp32 and bf16, on CUDA when it is available and otherwise on the CPU.
Each figure is the median of several timed repetitions after warm-up; ``tokens`` counts the padded
``B * T`` positions the loss processes. A later benchmark adds the Triton backend and more shapes.

Usage::

    python benchmarks/bench_loss.py                 # full table (well under a minute on 2 CPU cores)
    python benchmarks/bench_loss.py --quick         # one tiny shape, 2 repetitions (a smoke test)
    python benchmarks/bench_loss.py --out r.json    # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rlloss
from rlloss.recipes import DAPO, DR_GRPO, GRPO, Recipe

RECIPES: tuple[Recipe, ...] = (GRPO, DAPO, DR_GRPO)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES: tuple[tuple[int, int], ...] = ((8, 512), (16, 1024), (32, 2048))
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((8, 64),)
GROUP_SIZE = 8  # responses per prompt; every B above is a multiple of it


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_label(device: torch.device) -> str:
    """What the table says it was measured on."""
    if device.type == "cuda":
        return f"CUDA device {torch.cuda.get_device_name(device)}"
    return "CPU"


def make_inputs(batch: int, length: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict[str, Any]:
    """Synthetic rollout: log-probs in ``dtype``, per-sequence fp32 advantages, ragged mask."""
    gen = torch.Generator().manual_seed(seed)
    old_logp = -torch.rand(batch, length, generator=gen) * 3
    logp = old_logp + 0.05 * torch.randn(batch, length, generator=gen)
    ref_logp = old_logp + 0.05 * torch.randn(batch, length, generator=gen)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (batch,), generator=gen).float()
    return {
        "logp": logp.to(device=device, dtype=dtype).requires_grad_(True),
        "old_logp": old_logp.to(device=device, dtype=dtype),
        "ref_logp": ref_logp.to(device=device, dtype=dtype),
        "rewards": rewards.to(device),
        "mask": mask.to(device),
    }


def loss_step(recipe: Recipe, inputs: dict[str, Any], length: int) -> Callable[[], None]:
    """One forward + backward of the recipe's loss, with the arguments it needs."""
    adv = recipe.advantages(inputs["rewards"], GROUP_SIZE, backend="torch")
    extra: dict[str, Any] = {}
    if recipe.beta != 0:
        extra["ref_logp"] = inputs["ref_logp"]
    if recipe.aggregation == "constant":
        extra["max_tokens"] = length
    logp = inputs["logp"]

    def step() -> None:
        logp.grad = None
        loss, _ = recipe.loss(logp, inputs["old_logp"], adv, inputs["mask"], backend="torch", **extra)
        loss.backward()

    return step


def time_ms(step: Callable[[], None], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Wall-clock milliseconds of ``reps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run(shapes: tuple[tuple[int, int], ...], warmup: int, reps: int, device: torch.device, seed: int) -> list[dict]:
    """One row per (recipe, dtype, shape)."""
    rows = []
    for recipe in RECIPES:
        for dtype_name, dtype in DTYPES.items():
            for batch, length in shapes:
                inputs = make_inputs(batch, length, dtype, device, seed)
                times = time_ms(loss_step(recipe, inputs, length), device, warmup, reps)
                median = statistics.median(times)
                tokens = batch * length
                rows.append({
                    "recipe": recipe.name, "dtype": dtype_name, "B": batch, "T": length, "tokens": tokens,
                    "median_ms": median, "tokens_per_s": tokens / (median / 1e3), "times_ms": times,
                })
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("recipe", "dtype", "B x T", "tokens", "median ms fwd+bwd", "tokens/s")
    cells = [
        (r["recipe"], r["dtype"], f"{r['B']} x {r['T']}", f"{r['tokens']:,}", f"{r['median_ms']:.3f}",
         f"{r['tokens_per_s']:,.0f}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *cells)) for i in range(len(header))]
    left = (True, True, False, False, False, False)

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(line, widths, left)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(c) for c in cells)])


def record(rows: list[dict], device: torch.device, warmup: int, reps: int) -> dict[str, Any]:
    """Everything needed to read the figures later: machine, versions, date, command line."""
    return {
        "benchmark": "policy_loss fwd+bwd, backend=torch",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": {
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "rlloss": rlloss.__version__,
        "device": device_label(device),
        "torch_threads": torch.get_num_threads(),
        "warmup": warmup,
        "reps": reps,
        "results": rows,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 repetitions")
    parser.add_argument("--out", type=Path, help="write a JSON record of every figure to this path")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 2 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device: {device}")
    print(f'rlloss.policy_loss forward + backward, backend="torch", measured on {device_label(device)}; '
          f"median of {args.reps} after {args.warmup} warm-up; tokens = B*T (padded)")
    rows = run(shapes, args.warmup, args.reps, device, args.seed)
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record(rows, device, args.warmup, args.reps), indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
