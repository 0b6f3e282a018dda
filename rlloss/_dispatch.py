"""Backend selection: ``"auto" | "torch" | "triton"``.

``"auto"`` runs the Triton kernels on CUDA tensors when triton imports, otherwise the PyTorch
reference. ``"triton"`` asks for the kernels explicitly: on CUDA tensors it needs triton; on CPU
tensors it also needs Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
which is how the kernel tests run on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ._validate import check_choice

BACKENDS = ("auto", "torch", "triton")


@torch.compiler.assume_constant_result  # torch.compile: a constant of the process, not traced
def triton_available() -> bool:
    """True when triton can be imported (the import itself is cached by Python after the first)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent for "auto"
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """The backend that will run: ``"torch"`` or ``"triton"``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when ``"triton"`` is asked for
    where it cannot run (triton missing, or CPU tensors without ``TRITON_INTERPRET=1``).
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError('backend="triton" needs the triton package, which does not import here; '
                           'use backend="torch" or install triton')
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in present})
        raise RuntimeError(
            f'backend="triton" got tensors on {devices}: Triton kernels run on CUDA tensors, or on CPU '
            "tensors in Triton's interpreter, which needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return "triton"
