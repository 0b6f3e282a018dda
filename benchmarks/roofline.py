"""A roofline model of H100 time per backend, built from counted launches and bytes. A model, not a measurement.

    modelled time = counted bytes / achievable HBM bandwidth + counted launches * per-launch cost

Constants and their sources:

* ``HBM_BYTES_PER_S = 3.0e12``: a device-to-device copy measured on an H100 80GB HBM3 in
  November 2026 reached about 3.0 TB/s (read + written bytes); the data sheet says 3.35 TB/s.
* ``LAUNCH_US = 4.0``: the cost of one eager launch, CPU dispatch included. NVIDIA's Nsight Systems
  guide shows about 20 us of round trip for one PyTorch element-wise kernel on a V100; a 2026
  study of kernel dispatch on a B200 measured a 5 us dispatch path for a bare driver launch. The
  model is printed at 2 and 10 us as well, because the eager path's result depends on it.

The counts come from ``traffic.py``: aten ops recorded by a ``TorchDispatchMode`` for the PyTorch
paths (each op one kernel on a GPU), Triton's interpreter instrumented for loads and stores for
the fused path. The model ignores caches (a re-read that hits L2 costs less) and assumes every
kernel runs at the copy bandwidth (small eager kernels do not): it favours the eager path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from harness import Part, Run
from problems import make_problem
from rlloss.recipes import DAPO, DR_GRPO, GRPO, GSPO
from traffic import count_backend, interpreter_active, minimum_bytes

HBM_BYTES_PER_S = 3.0e12
LAUNCH_US = 4.0
LAUNCH_US_RANGE = (2.0, 10.0)
MODEL_SIZE = (64, 16384)  # 1,048,576 tokens
# The default run counts rows of the same length, fewer of them: the interpreter's cost grows with
# the tokens (about 30 s of CPU per fused count at 1M tokens, 8 counts; measured 10 s at 8 rows and
# 2 s at 2 rows on the loaded 2-core machine), the per-row work does not.
DEFAULT_SIZE = (2, 16384)  # 32,768 tokens
QUICK_SIZE = (8, 256)
BACKENDS = ("trl-inline", "torch", "triton")
LABEL = {"trl-inline": "trl-inline", "torch": "rlloss-torch", "triton": "rlloss-triton"}


def modelled_us(n_bytes: int, launches: int, launch_us: float = LAUNCH_US) -> float:
    return n_bytes / HBM_BYTES_PER_S * 1e6 + launches * launch_us


@dataclasses.dataclass
class ModelRow:
    recipe: str
    dtype: str
    backend: str
    launches: int
    bytes: int
    minimum_bytes: int
    allocated_bytes: int  # buffers created by explicit allocation (the fused path's, all of them)
    fp32_bt_bytes: int  # one fp32 [B, T] buffer, the memory goal's unit

    @property
    def us(self) -> float:
        return modelled_us(self.bytes, self.launches)


def count_all(b: int, t: int) -> tuple[list[ModelRow], list[str]]:
    """Counted forward+backward for every recipe, dtype and backend; and what was skipped."""
    rows, skipped = [], []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        problem = make_problem(b, t, dtype, "cpu", mask="prefix")
        for recipe in (GRPO, DAPO, DR_GRPO, GSPO):
            for backend in BACKENDS:
                if backend == "triton" and not interpreter_active():
                    skipped.append(f"{LABEL[backend]} {recipe.name} {dtype_name}: the interpreter is off "
                                   "(a CUDA run); its loads and stores cannot be counted")
                    continue
                counts = count_backend(problem, recipe, backend)
                rows.append(ModelRow(recipe.name + (" +KL" if recipe.beta else ""), dtype_name, LABEL[backend],
                                     counts.n_launches, counts.bytes, minimum_bytes(problem, recipe),
                                     counts.allocated_bytes, 4 * b * t))
    return rows, skipped


def table(rows: list[ModelRow]) -> str:
    base = {(r.recipe, r.dtype): r.us for r in rows if r.backend == "trl-inline"}
    eager = {(r.recipe, r.dtype): r.us for r in rows if r.backend == "rlloss-torch"}
    lo, hi = LAUNCH_US_RANGE
    head = (f"{'recipe':<11}{'dtype':<6}{'backend':>15}{'launches':>10}{'MiB moved':>11}{'x min':>7}"
            f"{'model us':>10}{'x trl':>8}{'x eager':>9}{f'x trl @{lo:g}us':>13}{f'x trl @{hi:g}us':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        key = (r.recipe, r.dtype)
        trl = next(x for x in rows if (x.recipe, x.dtype, x.backend) == (*key, "trl-inline"))
        at = lambda row, us: modelled_us(row.bytes, row.launches, us)  # noqa: E731
        lines.append(
            f"{r.recipe:<11}{r.dtype:<6}{r.backend:>15}{r.launches:>10}{r.bytes / 2**20:>11.2f}"
            f"{r.bytes / r.minimum_bytes:>7.2f}{r.us:>10.1f}{base[key] / r.us:>8.2f}{eager[key] / r.us:>9.2f}"
            f"{at(trl, lo) / at(r, lo):>13.2f}{at(trl, hi) / at(r, hi):>13.2f}"
        )
    return "\n".join(lines)


def report(quick: bool = False, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Count, model, print; return everything for the JSON record."""
    b, t = size or (QUICK_SIZE if quick else MODEL_SIZE)
    print(f"\ncounted forward+backward at B x T = {b}x{t} ({b * t:,} tokens), prefix-padded masks: launches and bytes "
          "(aten ops via TorchDispatchMode; Triton interpreter loads and stores: lanes outside a load's row bounds move "
          "nothing, masked tokens inside a row are loaded, as a GPU's sectors would be)")
    print(f"MODELLED H100 time (a model, not a measurement) = bytes / {HBM_BYTES_PER_S / 1e12:g} TB/s "
          f"+ launches x {LAUNCH_US:g} us; x trl / x eager = modelled speed-up over trl-inline / rlloss-torch")
    rows, skipped = count_all(b, t)
    print(table(rows))
    for line in skipped:
        print("skipped: " + line)
    fused = [r for r in rows if r.backend == "rlloss-triton"]
    if fused:
        print("fused path, every buffer it allocates (counted torch.empty calls), in fp32 [B, T] buffers, "
              "gradient included: " + ", ".join(f"{r.recipe} {r.dtype} {r.allocated_bytes / r.fp32_bt_bytes:.3f}"
                                                 for r in fused))
    return {
        "kind": "counted launches and bytes; modelled H100 time",
        "size": [b, t],
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "launch_us": LAUNCH_US,
        "launch_us_range": list(LAUNCH_US_RANGE),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0"),
        "rows": [dataclasses.asdict(r) | {"modelled_us": r.us} for r in rows],
        "skipped": skipped,
    }


def count_and_model(run: Run) -> dict[str, Any]:
    """``bench_loss.py``'s part: the counted traffic and the modelled time, for the JSON record."""
    # without the interpreter (a CUDA run) only the cheap eager paths are counted: the full size
    size = QUICK_SIZE if run.quick else MODEL_SIZE if run.full or not interpreter_active() else DEFAULT_SIZE
    if size != MODEL_SIZE:
        run.skip(f"counted traffic at {MODEL_SIZE[0]}x{MODEL_SIZE[1]} ({MODEL_SIZE[0] * MODEL_SIZE[1]:,} tokens): counted "
                 f"and modelled at {size[0]}x{size[1]} instead (--full counts the full size)")
    return {"model": report(size=size)}


PART = Part("counted traffic and the roofline model", count_and_model, flag="model",
            help="leave out the counted traffic and the roofline model")
