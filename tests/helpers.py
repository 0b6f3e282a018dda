"""What every test module shares: device, backends, per-dtype tolerances, comparison helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import pytest
import torch

from rlloss._dispatch import interpreter_enabled, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")


def triton_runs_here() -> bool:
    return triton_available() and (DEVICE.type == "cuda" or interpreter_enabled())


# Every property test runs on each backend that can run here.
BACKENDS = ["torch", "triton"] if triton_runs_here() else ["torch"]


def under_ci() -> bool:
    """``CI`` set to anything but empty, 0 or false: what is installed there must be there."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def require_trainer(missing: ImportError | None) -> None:
    """In a test marked ``trainers``: the trainer its module imports, or a failure under CI (never a
    skip there: CI installs the trainers), or a skip that says what to install elsewhere.

    The module imports its trainer in a ``try`` and keeps the ``ImportError``, so that it still
    imports without it and the default run deselects its tests (``-m "not trainers"``).
    """
    if missing is None:
        return
    message = (f"{missing}: the trainer integrations' tests need TRL and verl at their tested versions "
               "(.ci/run's second environment installs them; README.md, Set-up)")
    if under_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclasses.dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float


# Written once. Values are fp32 arithmetic whatever the input dtype, so forward outputs use the fp32
# row; gradients come back in the input's dtype and carry its rounding (one ulp of bf16 is 2^-8
# relative, of fp16 2^-11; two roundings may differ by one ulp).
TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float64: Tol(rtol=1e-10, atol=1e-12),
    torch.float32: Tol(rtol=2e-5, atol=1e-6),
    torch.bfloat16: Tol(rtol=1.6e-2, atol=1e-6),
    torch.float16: Tol(rtol=2e-3, atol=1e-6),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *,
                 scale: float | torch.Tensor = 0.0, what: str = "") -> None:
    """``|actual - expected| <= atol + rtol * (|expected| + scale)`` with the tolerances of ``dtype``.

    ``scale`` is for results with cancellation: the magnitude that rounding errors are relative to
    (for a reordered sum, the same sum over absolute values; for a sum of two gradient terms, the
    sum of their magnitudes), a number or a tensor of ``expected``'s shape.
    """
    tol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    allowed = tol.atol + tol.rtol * (e.abs() + (scale.detach().double() if isinstance(scale, torch.Tensor) else scale))
    bad = ~((a - e).abs() <= allowed) | (a.isnan() != e.isnan())
    bad &= ~((a.isnan() & e.isnan()) | (a == e))  # equal infinities (fp16 overflow on both sides) match
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond {dtype} tolerance; "
                             f"first at {idx}: actual {a[tuple(idx)].item()!r}, expected {e[tuple(idx)].item()!r}, "
                             f"allowed difference {allowed[tuple(idx)].item() if allowed.dim() else allowed.item()!r}")


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a test's process group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(target, world: int, out_dir, timeout_s: float, *args) -> list[dict]:
    """Run ``target(rank, port, out_dir, *args)`` in ``world`` spawned processes and collect their results.

    Each rank saves ``rank{r}.pt`` (or writes ``rank{r}.err`` with its traceback) in ``out_dir``.
    Ranks still alive after ``timeout_s`` are killed and the test fails with every rank's error,
    so a hung collective cannot hang CI. The children inherit ``TRITON_INTERPRET=1``.
    """
    import multiprocessing
    import os
    import time
    from pathlib import Path

    import pytest

    out_dir = Path(out_dir)
    ctx = multiprocessing.get_context("spawn")
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, port, str(out_dir), *args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    errors = "\n".join(f.read_text() for f in sorted(out_dir.glob("rank*.err")))
    if hung:
        pytest.fail(f"ranks {hung} did not finish within {timeout_s} s and were killed\n{errors}")
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}\n{errors}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@contextlib.contextmanager
def gloo_rank(rank: int, port: int, out_dir, world: int):
    """The child side of ``spawn_ranks``: join the gloo group on localhost for the body, then leave it.

    A failure in the body is written to ``rank{r}.err`` (the parent shows it) and re-raised.
    """
    import datetime
    import traceback
    from pathlib import Path

    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        yield
        dist.barrier()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
