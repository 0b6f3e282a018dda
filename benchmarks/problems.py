"""The benchmarks' inputs and the losses their contenders compute: one source for every script.

Input builders (synthetic rollouts: right-padded masks, per-sequence advantages, a small policy
drift). Each keeps the random stream its figures were first taken with, so counts and peak
memory stay comparable with the recorded results:

* ``loss_inputs``: the timed policy-loss problem of ``bench_loss.py`` (fp32 advantages);
* ``make_problem``: the counted one of ``traffic.py`` and ``roofline.py`` (advantages in the
  inputs' dtype; a full or a prefix mask);
* ``compile_inputs``: the launches captured by ``compile/gpu_compile.py`` (optionally per-token advantages);
* ``logits_inputs``: ``[B, T, V]`` bf16 logits for the from-logits problem;
* ``helper_inputs``: the off-policy helpers and advantage estimators of ``count_helpers.py``.

Losses: ``rlloss_loss`` (the public ``policy_loss``), ``trl_loss`` (TRL's arithmetic written
inline, ``trl_inline.py``) and ``reference_loss`` (the reference computation past validation, what
the ``torch.compile`` contenders compile). This module is the only one in ``benchmarks/`` that
names a private function of rlloss.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rlloss
from rlloss.recipes import Recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl_inline import trl_grpo_loss  # noqa: E402

LossFn = Callable[[torch.Tensor], torch.Tensor]
TRL_LOSS_TYPE = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "constant": "dr_grpo"}


# --- inputs ------------------------------------------------------------------------------------

def loss_inputs(b: int, t: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The timed policy-loss problem: ``[B, T]`` log-probs in ``dtype``, fp32 ``[B]`` advantages,
    lengths uniform in ``[T/4, T]``."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 4
    # log-probabilities: at most 0 (policy_loss counts and warns about any above)
    logp = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    ref = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    return {
        "logp": logp.to(device, dtype),
        "old_logp": old.to(device, dtype),
        "ref_logp": ref.to(device, dtype),
        "adv": torch.randn(b, generator=gen).to(device),
        "mask": (torch.arange(t)[None, :] < lengths[:, None]).to(device),
    }


@dataclasses.dataclass
class Problem:
    """Inputs of ``policy_loss``; ``tests/strategies.LossProblem`` has the same fields."""

    logp: torch.Tensor
    old_logp: torch.Tensor | None
    adv: torch.Tensor
    mask: torch.Tensor
    ref_logp: torch.Tensor


def make_problem(b: int, t: int, dtype: torch.dtype, device: torch.device | str = "cpu", *, mask: str = "full",
                 seed: int = 0) -> Problem:
    """The counted policy-loss problem: log-probs and ``[B]`` advantages in ``dtype``, a bool mask.

    ``mask="full"``: every token valid (no masked lane saves the fused kernels anything);
    ``"prefix"``: right padding with lengths uniform in ``[T/4, T]``.
    """
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 3
    logp = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0)  # log-probabilities: at most 0
    ref = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    adv = torch.randn(b, generator=gen)
    if mask == "full":
        m = torch.ones(b, t, dtype=torch.bool)
    elif mask == "prefix":
        lengths = torch.randint(max(t // 4, 1), t + 1, (b,), generator=gen)
        m = torch.arange(t)[None, :] < lengths[:, None]
    else:
        raise ValueError(f"mask must be 'full' or 'prefix', got {mask!r}")

    def put(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    return Problem(put(logp).requires_grad_(True), put(old), put(adv), m.to(device), put(ref))


def compile_inputs(dtype: torch.dtype, b: int, t: int, *, per_token_adv: bool = False,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(logp as a leaf, old_logp, adv, mask, ref_logp) on the CPU; fp32 advantages, ``[B]`` or ``[B, T]``."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 3
    logp = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0).to(dtype).requires_grad_(True)
    ref = (old + 0.05 * torch.randn(b, t, generator=gen)).clamp(max=0.0).to(dtype)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=gen)
    return logp, old.to(dtype), adv, mask, ref


LOGITS_ROW = 1024  # tokens per sequence of the from-logits problem; B = tokens / LOGITS_ROW


def logits_inputs(tokens: int, vocab: int, device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 ``[B, T, V]`` logits, token ids, old log-probs near the current ones, ``[B]`` advantages."""
    b = max(tokens // LOGITS_ROW, 1)
    t = tokens // b
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, vocab, generator=gen, dtype=torch.bfloat16) * 2).to(device)
    ids = torch.randint(0, vocab, (b, t), generator=gen).to(device)
    with torch.no_grad():
        old = rlloss.token_logprobs(logits, ids, backend="torch") + 0.05 * torch.randn(b, t, generator=gen).to(device)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen).to(device)
    return {"logits": logits, "ids": ids, "old_logp": old, "adv": torch.randn(b, generator=gen).to(device),
            "mask": torch.arange(t, device=device)[None, :] < lengths[:, None]}


def helper_inputs(b: int, t: int, group: int, seed: int = 0) -> dict[str, Any]:
    """Everything the off-policy helpers and the advantage estimators read, for ``B`` rows in groups."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 3
    lengths = torch.randint(max(t // 4, 1), t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    token_rewards = torch.zeros(b, t)
    token_rewards[torch.arange(b), lengths - 1] = torch.randint(0, 2, (b,), generator=gen).float()
    return {
        "old": old,
        "sampling": old + 0.05 * torch.randn(b, t, generator=gen),
        "logp": old + 0.05 * torch.randn(b, t, generator=gen),
        "entropy": torch.rand(b, t, generator=gen) * 4,
        "mask": mask,
        "adv": torch.randn(b, generator=gen),
        "scores": torch.randint(0, 2, (b,), generator=gen).float(),
        "scores_k": torch.rand(3, b, generator=gen),
        "ids": torch.arange(b) // group,
        "token_rewards": token_rewards,
        "sum_pi_squared": torch.rand(b, t, generator=gen),
        "baseline": torch.rand(b, generator=gen),
        "group": group,
    }


# --- the losses the contenders compute -----------------------------------------------------------

def loss_options(recipe: Recipe, t: int, beta: float | None = None) -> dict[str, Any]:
    """``policy_loss`` keywords for ``recipe`` on rows of ``T`` tokens (``max_tokens`` for Dr. GRPO's
    constant), its KL coefficient replaced by ``beta`` when given."""
    kw = {**recipe.loss_kwargs(), "beta": recipe.beta if beta is None else beta}
    if recipe.aggregation == "constant":
        kw["max_tokens"] = t
    return kw


def rlloss_loss(old_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor,
                recipe: Recipe, backend: str, beta: float | None = None) -> LossFn:
    """``rlloss.policy_loss`` with ``recipe``'s options, as a function of ``logp``."""
    kw = loss_options(recipe, mask.shape[1], beta)
    if kw["beta"] != 0:
        kw["ref_logp"] = ref_logp

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return rlloss.policy_loss(logp, old_logp, adv, mask, backend=backend, **kw).loss

    return loss


def trl_loss(old_logp: torch.Tensor | None, adv: torch.Tensor, mask: torch.Tensor, ref_logp: torch.Tensor,
             recipe: Recipe, beta: float | None = None) -> LossFn:
    """TRL's GRPO loss arithmetic (``trl_inline.py``) with ``recipe``'s options, as a function of ``logp``."""
    beta = recipe.beta if beta is None else beta
    t = mask.shape[1]

    def loss(logp: torch.Tensor) -> torch.Tensor:
        return trl_grpo_loss(logp, old_logp, adv, mask, loss_type=TRL_LOSS_TYPE[recipe.aggregation],
                             eps_low=recipe.eps_low, eps_high=recipe.eps_high, beta=beta,
                             ref_logp=ref_logp if beta != 0 else None, max_completion_length=t,
                             level=recipe.level)

    return loss


def reference_args(kw: dict[str, Any]) -> tuple[Any, ...]:
    """The reference's arguments after ``(logp, old_logp, adv, mask)`` for ``policy_loss`` keywords
    ``kw`` (what ``policy_loss`` itself passes once it has validated them)."""
    from rlloss.objectives import PPO

    objective = PPO(eps_low=kw["eps_low"], eps_high=kw.get("eps_high"), level=kw.get("level", "token"))
    return (objective, kw.get("ref_logp"), kw.get("beta", 0.0), "k3", False, None, 20.0, kw["aggregation"],
            kw.get("max_tokens"), None, None, 1)


def policy_reference() -> Callable[..., Any]:
    """``policy_loss``'s reference computation past validation (validation is Python on numbers,
    outside what ``torch.compile`` should see)."""
    from rlloss.loss import _policy_loss_torch

    return _policy_loss_torch


def logits_reference(loss_kw: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """``policy_loss_from_logits``'s reference past validation: ``(logits, ids, old, adv, mask) -> loss``."""
    from rlloss.logits import _token_logprobs_torch

    loss_args = reference_args(loss_kw)
    policy = policy_reference()

    def reference(logits, ids, old, adv, mask):
        logp, _ = _token_logprobs_torch(logits, ids, 1.0, False)
        return policy(logp, old, adv, mask, *loss_args).loss

    return reference
