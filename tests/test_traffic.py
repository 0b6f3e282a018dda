"""Counted launches and bytes of the fused ``policy_loss`` (forward + backward), and of the counters.

The counts come from ``benchmarks/traffic.py``: aten ops through a ``TorchDispatchMode`` (the
Triton wrapper's torch ops count too), Triton launches and their load/store bytes through Triton's
interpreter. Bounds at a mid size (16 x 1024): token-level objectives at most 3 launches and 2x
the minimum bytes, the row-statistic objectives (GSPO's sequence-level ratio, GMPO's geometric mean)
at most 4 and 2.5x. The eager counts are printed
(``pytest -s``), not asserted.

The Triton counts need the interpreter: on a CUDA machine run without ``TRITON_INTERPRET=1`` the
compiled kernels cannot be instrumented and those tests skip, saying so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import harness  # noqa: E402
import traffic  # noqa: E402
from rlloss.recipes import DAPO, DR_GRPO, GMPO_RECIPE, GRPO, GSPO  # noqa: E402
from strategies import make_problem  # noqa: E402

if harness.triton_version() is None:
    SKIP_REASON = "triton does not import here: there is no Triton path to count"
elif not traffic.interpreter_active():
    SKIP_REASON = ("TRITON_INTERPRET=1 is not set (a CUDA run): Triton launches and bytes are counted by "
                   "instrumenting Triton's interpreter, and compiled CUDA kernels cannot be instrumented that way")
else:
    SKIP_REASON = ""
needs_interpreter = pytest.mark.skipif(bool(SKIP_REASON), reason=SKIP_REASON)

B, T = 16, 1024  # the mid size of the benchmark issue
# recipe -> (launches, bytes / minimum), forward + backward
BOUNDS = {GRPO.name: (3, 2.0), DAPO.name: (3, 2.0), DR_GRPO.name: (3, 2.0), GSPO.name: (4, 2.5),
          GMPO_RECIPE.name: (4, 2.5)}


# --------------------------------------------------------------------------------- the counters


def test_torch_counter_counts_one_add_and_its_bytes():
    n = 1000
    x, y = torch.randn(n), torch.randn(n)
    c = traffic.count_torch_ops(lambda: torch.add(x, y))
    assert [launch.name for launch in c.launches] == ["aten.add.Tensor"]
    assert (c.bytes_read, c.bytes_written) == (2 * n * 4, n * 4)
    assert c.bytes == 3 * n * 4


def test_torch_counter_skips_views_and_allocations_and_counts_broadcast_storage():
    n = 256
    x = torch.randn(n, 4)

    def views_only() -> None:
        x.view(4, n).t().unsqueeze(0).expand(3, -1, -1)
        x[1:, 2].detach()
        torch.empty(n)
        torch.empty_like(x)

    c = traffic.count_torch_ops(views_only)
    assert c.n_launches == 0 and c.bytes == 0, c.table()
    assert sum(c.not_counted.values()) >= 6

    col = torch.randn(n, 1)
    c = traffic.count_torch_ops(lambda: x * col.expand(n, 4))  # stride-0 input: n stored elements
    assert c.n_launches == 1
    assert (c.bytes_read, c.bytes_written) == (4 * n * 4 + n * 4, 4 * n * 4)

    dst = torch.empty(n, 4)
    c = traffic.count_torch_ops(lambda: dst.copy_(x))  # a destination overwritten, not read
    assert (c.n_launches, c.bytes_read, c.bytes_written) == (1, 4 * n * 4, 4 * n * 4)

    c = traffic.count_torch_ops(lambda: x.sum().item())
    assert c.n_launches == 1 and c.syncs == 1


@needs_interpreter
def test_triton_counter_counts_active_lanes_once_per_launch():
    import triton
    import triton.language as tl

    @triton.jit
    def half_copy(src_ptr, scale_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        scale = tl.load(scale_ptr)  # unmasked scalar load: every program reads it
        x = tl.load(src_ptr + offs, mask=inside, other=0.0)
        tl.store(dst_ptr + offs, x * scale, mask=inside & (offs % 2 == 0))

    n, block = 1000, 256  # 4 programs, 24 lanes of the last one out of range
    src, scale = torch.randn(n), torch.ones(1)

    def run() -> torch.Tensor:
        dst = torch.empty(n)  # an allocation: not a launch
        half_copy[(triton.cdiv(n, block),)](src, scale, dst, n, BLOCK=block)
        return dst

    c = traffic.count_triton(run)
    assert [(launch.name, launch.programs) for launch in c.launches] == [("triton.half_copy", 4)], c.table()
    assert c.bytes_read == n * 4 + 4 * 4  # the in-range lanes, plus the scalar once per program
    assert c.bytes_written == n // 2 * 4  # masked-off lanes move nothing


# --------------------------------------------------------------------------------- the fused path


def counted(problem, recipe, backend: str) -> traffic.Counts:
    return traffic.count_backend(problem, recipe, backend)


@needs_interpreter
@pytest.mark.parametrize("mask_kind", ["full", "prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", [GRPO, DAPO, DR_GRPO, GSPO, GMPO_RECIPE], ids=lambda r: r.name.replace(" ", ""))
def test_fused_policy_loss_launches_and_bytes(recipe, dtype, mask_kind):
    problem = make_problem(B, T, dtype, seed=0, mask_kind=mask_kind)
    floor = traffic.minimum_bytes(problem, recipe)
    fused = counted(problem, recipe, "triton")
    eager = counted(problem, recipe, "torch")
    max_launches, max_ratio = BOUNDS[recipe.name]
    report = (
        f"{recipe.name} {dtype} mask={mask_kind} B={B} T={T}: fused {fused.n_launches} launches, "
        f"{fused.bytes:,} bytes = {fused.bytes / floor:.2f}x the minimum {floor:,} (bounds {max_launches}, "
        f"{max_ratio}x); eager reference {eager.n_launches} launches, {eager.bytes / floor:.1f}x\n{fused.table()}"
    )
    print(report)
    assert fused.syncs == 0, report
    assert fused.n_launches <= max_launches, report
    assert fused.bytes <= max_ratio * floor, report


# --------------------------------------------------------------------------------- from logits

LB, LT, LV = 4, 64, 4096  # the counts scale with B*T*V: a small problem shows the same ratios
# Fused from-logits, forward + backward: token-level objectives at most 5 launches, the first the
# check that every id read lies in the vocabulary (GSPO 6: its row-ratio pass), no sync. Bytes: the forward reads the logits once, the backward reads them again
# and writes the gradient, so with every position valid the ratio to the read-once-write-once floor
# is 3/2 plus the small per-token inputs: 1.5x is the floor of any design with a separate backward
# (1.45x would need the gradient formed in the forward, before grad_out is known). Masked positions
# are neither read nor recomputed (prefix masks: about 1.1x).
LOGITS_BOUNDS = {"full": 1.51, "prefix": 1.2}


@needs_interpreter
@pytest.mark.parametrize("mask_kind", ["full", "prefix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("recipe", [GRPO, DAPO, GSPO], ids=lambda r: r.name.replace(" ", ""))
def test_fused_policy_loss_from_logits_launches_and_bytes(recipe, dtype, mask_kind):
    problem = traffic.make_logits_problem(LB, LT, LV, dtype, mask=mask_kind)
    floor = traffic.minimum_bytes_from_logits(problem, recipe)
    fused = traffic.count_from_logits(problem, recipe, "triton")
    max_launches = 6 if recipe.level == "sequence" else 5
    report = (f"from logits {recipe.name} {dtype} mask={mask_kind} B={LB} T={LT} V={LV}: {fused.n_launches} launches, "
              f"{fused.syncs} syncs, {fused.bytes / floor:.3f}x the minimum {floor:,}\n{fused.table()}")
    print(report)
    assert fused.syncs == 0, report
    assert fused.n_launches <= max_launches, report
    assert all(launch.kind == "triton" for launch in fused.launches), report  # no torch glue between the kernels
    assert fused.bytes <= LOGITS_BOUNDS[mask_kind] * floor, report
