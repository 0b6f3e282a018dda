"""Input checks shared by the public functions.

Every check raises a ``ValueError`` or ``TypeError`` that names the argument, says what it got and
what was expected. The public functions call these once; references and kernels never re-check.
Checks that would need a device synchronisation (looking at values) are kept to inputs that are
small and computed once per batch (rewards, lengths), never to the per-token tensors of the loss.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
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


GROUPS_HELP = "pass group_size=G for contiguous groups of G, or groups=<integer tensor [N] of group ids>"


def check_groups(groups: object, group_size: object, n: int, device: torch.device) -> int | torch.Tensor:
    """Exactly one of ``group_size`` (an int dividing ``n``) and ``groups`` (an integer id tensor ``[n]``).

    Returns the int group size (contiguous groups, TRL's layout) or the id tensor (verl's ``index``),
    the form the references and kernels take. An int given as ``groups`` is refused: read as "8
    groups" where it means groups of 8, it would silently give another normalisation.
    """
    if groups is not None and not isinstance(groups, torch.Tensor):
        if isinstance(groups, numbers.Integral):  # bool and numpy integers included
            size = int(groups)
            raise TypeError(f"groups={groups!r} is ambiguous (a number of groups, or a group size?): pass "
                            f"group_size={size} for contiguous groups of {size}, or groups=<integer tensor [N] "
                            "of group ids>")
        raise TypeError(f"groups must be an integer tensor [N] of group ids, got {type(groups).__name__} "
                        f"({GROUPS_HELP})")
    if groups is None and group_size is None:
        raise TypeError(f"the groups are missing: {GROUPS_HELP}")
    if groups is not None and group_size is not None:
        raise TypeError(f"got both groups (a tensor of ids) and group_size={group_size!r}; {GROUPS_HELP}, not both")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise TypeError(f"group_size must be an int (the number of samples per group), got "
                            f"{type(group_size).__name__} {group_size!r}")
        size = int(group_size)
        if size < 1:
            raise ValueError(f"group_size must be >= 1, got {size}")
        if n % size != 0:
            raise ValueError(f"group_size={size} does not divide the number of samples N={n}")
        return size
    if groups.dim() == 0:
        raise TypeError(f"groups must be a tensor [N] of group ids, got a 0-d tensor ({GROUPS_HELP})")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool or groups.is_complex():
        raise TypeError(f"groups must hold integer group ids, got a {groups.dtype} tensor")
    if groups.shape != torch.Size([n]):
        raise ValueError(f"groups (group ids) must have shape [N]={[n]}, got {list(groups.shape)}")
    if groups.device != device:
        raise ValueError(f"groups must be on {device} like the samples, got {groups.device}")
    return groups


class EmptyBatchWarning(UserWarning):
    """A loss or a step had no valid token: nothing was trained on (every position masked).

    Issued through ``warnings``, so Python's default filter shows it once per call site, not once
    per call; silence it with ``warnings.filterwarnings("ignore", category=rlloss.EmptyBatchWarning)``
    or turn it into an error with ``"error"``.
    """


class SuspiciousInputWarning(UserWarning):
    """A loss was given values it should not see at valid positions: NaN or inf, or a log-prob above 0.

    They are used as given (a NaN makes the loss NaN) and counted into the metrics
    (``nonfinite_inputs``, ``positive_logp``); the warning says so where the counts are free to read.
    Issued through ``warnings``: shown once per call site; silence it with
    ``warnings.filterwarnings("ignore", category=rlloss.SuspiciousInputWarning)`` or make it an error
    with ``"error"``.
    """


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside rlloss: the user's call, whichever wrapper it went through."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_empty(count: Number | torch.Tensor | None, message: str) -> None:
    """``EmptyBatchWarning(message)`` when ``count`` is 0, looked at only where that is free.

    A Python number, or a tensor on the CPU, is read; a tensor on an accelerator is not (reading it
    would synchronise the device), nor anything while ``torch.compile`` traces (a graph break).
    """
    if count is None or torch.compiler.is_compiling():
        return
    if isinstance(count, torch.Tensor):
        if count.device.type != "cpu":
            return
        count = count.item()
    if count == 0:
        warnings.warn(message, EmptyBatchWarning, stacklevel=_caller_stacklevel())


def warn_if_suspicious(nonfinite: torch.Tensor, positive: torch.Tensor, where: str) -> None:
    """``SuspiciousInputWarning`` when either count (0-d tensors) is not 0, looked at only where that is free.

    As ``warn_if_empty``: counts on the CPU are read, counts on an accelerator are not (a device
    sync), nor anything while ``torch.compile`` traces (a graph break).
    """
    if torch.compiler.is_compiling() or nonfinite.device.type != "cpu":
        return
    bad, above = int(nonfinite.item()), int(positive.item())
    if bad:
        warnings.warn(f"{where}: {bad} valid position(s) hold NaN or inf in logp, old_logp, ref_logp, adv or "
                      "token_weights, and are used as given (a NaN makes the loss NaN); fix them upstream or mask "
                      "them out (metrics['nonfinite_inputs'] counts them)", SuspiciousInputWarning,
                      stacklevel=_caller_stacklevel())
    if above:
        warnings.warn(f"{where}: {above} valid position(s) have a log-prob (logp, old_logp or ref_logp) above 0 "
                      "(by more than 2**-10), which no log-probability is: logits passed as log-probs, or a broken "
                      "log-prob computation upstream? They are used as given (metrics['positive_logp'] counts them)",
                      SuspiciousInputWarning, stacklevel=_caller_stacklevel())


def check_scores(name: str, scores: object, *, ndim: int = 1) -> torch.Tensor:
    """Per-sequence scores: real, finite; integer or bool scores become fp32."""
    check_tensor(name, scores, ndim=ndim)
    if scores.is_complex():
        raise TypeError(f"{name} must be real, got {scores.dtype}")
    if not scores.dtype.is_floating_point:
        return scores.to(torch.float32)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf values")
    return scores


def check_ids_in_vocab(ids: torch.Tensor, vocab: int | torch.Tensor, *, where: torch.Tensor | None = None,
                       of: str = "logits") -> None:
    """Token ids (at the positions ``where`` is True) must index the vocabulary of ``of``.

    Eager on the CPU: a ``ValueError`` with the values found and how to fix padding (it costs no
    sync there). On an accelerator and while compiling, ``torch._assert_async``: a device-side
    check, no host sync and no graph break; the error surfaces at the next sync. ``vocab`` may be a
    0-d tensor (the global vocabulary of a vocabulary-parallel head).
    """
    ok = (ids >= 0) & (ids < vocab)
    if where is not None:
        ok = ok | ~where
    if torch.compiler.is_compiling() or ids.device.type != "cpu":
        torch._assert_async(ok.all(), f"rlloss: ids outside the vocabulary of {of} where they are read")
        return
    if not bool(ok.all()):
        bad = ids[~ok]
        raise ValueError(f"ids must be in [0, {int(vocab)}) (the vocabulary of {of}), got values in "
                         f"[{int(bad.min())}, {int(bad.max())}]; padding ids (such as -100, the ignore index "
                         "of Hugging Face labels) are never tokens: mask them out (mask= False there) so they are "
                         "not read")
