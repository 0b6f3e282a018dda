"""Input checks shared by the public functions.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument, says what it got and
what was expected. The public functions call these once; references and kernels never re-check.
Checks that would need a device synchronisation (looking at values) are kept to inputs that are
small and computed once per batch (rewards, lengths), never to the per-token tensors of the loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Number = int | float

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object, *, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """``x`` must be a tensor, optionally of the given rank(s)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x: object, *, ndim: int | Sequence[int] | None = None) -> torch.Tensor:
    """``x`` must be a floating tensor (fp16, bf16, fp32 or fp64)."""
    t = check_tensor(name, x, ndim=ndim)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


def check_same_shape(name: str, x: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)} "
            "(no broadcasting is done)"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        got = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {got}")


def check_mask(name: str, mask: object, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """A mask of the shape of ``like``: bool, or numeric where non-zero means valid. Returns bool."""
    m = check_tensor(name, mask)
    check_same_shape(name, m, like_name, like)
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise TypeError(f"{name} must be bool or real numeric, got {m.dtype}")
    return m != 0


def check_adv(name: str, adv: object, like_name: str, like: torch.Tensor) -> torch.Tensor:
    """Advantages per sequence ``[B]`` or per token ``[B, T]`` for a ``[B, T]`` tensor ``like``."""
    a = check_float(name, adv)
    B, T = like.shape
    if a.shape not in (torch.Size([B]), torch.Size([B, T])):
        raise ValueError(
            f"{name} must be [B]={[B]} (per sequence) or [B, T]={[B, T]} (per token) to match "
            f"{like_name}, got {list(a.shape)}"
        )
    return a


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    high: float | None = None,
    high_inclusive: bool = True,
    allow_none: bool = False,
) -> Number | None:
    """A finite Python number (bools refused) within optional bounds."""
    if value is None and allow_none:
        return None
    if torch.compiler.is_compiling():
        # under torch.compile(dynamic=True) a number may be symbolic: testing its value would guard on
        # it or break the graph. Eager calls check it; the compiled graph is traced from the same code.
        return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low}, got {value!r}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high}, got {value!r}")
    return value


def check_count(name: str, value: object, device: torch.device) -> Number | torch.Tensor | None:
    """A global count or normaliser: None, a non-negative number, or a 0-d/1-element tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like the inputs, got {value.device}")
        return value.reshape(())
    return check_number(name, value, low=0)


def check_values(ok: torch.Tensor, message: str, error: type[Exception] = ValueError) -> None:
    """A check of tensor values (``ok`` a bool tensor, all True when the input is good).

    Eager: ``error(message)`` when any is False (one device sync, for small per-batch inputs).
    While compiling: ``torch._assert_async``, a device-side check with no graph break and no sync.
    """
    if torch.compiler.is_compiling():
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise error(message)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 arithmetic for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (gradcheck)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_groups(groups: object, n: int, device: torch.device) -> int | torch.Tensor:
    """An int group size dividing ``n`` (contiguous groups) or an integer id tensor ``[n]``."""
    if isinstance(groups, bool):
        raise TypeError(f"groups must be an int group size or an integer tensor of group ids, got {groups!r}")
    if isinstance(groups, int):
        if groups < 1:
            raise ValueError(f"groups (group size) must be >= 1, got {groups}")
        if n % groups != 0:
            raise ValueError(f"groups={groups} does not divide the number of samples N={n}")
        return groups
    if isinstance(groups, torch.Tensor):
        if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
            raise TypeError(f"groups as a tensor must hold integer group ids, got {groups.dtype}")
        if groups.shape != torch.Size([n]):
            raise ValueError(f"groups (group ids) must have shape [N]={[n]}, got {list(groups.shape)}")
        if groups.device != device:
            raise ValueError(f"groups must be on {device} like rewards, got {groups.device}")
        return groups
    raise TypeError(f"groups must be an int group size or an integer tensor of group ids, got {type(groups).__name__}")
