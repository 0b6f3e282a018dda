"""Every ``rlloss::`` custom op passes ``torch.library.opcheck``: schema, fake implementation, autograd
registration and AOT dispatch (with dynamic shapes), on a few shapes and dtypes, in the interpreter.

The list of ops is read from the registry, so an op added to ``rlloss.kernels.ops`` without a
case here fails ``test_every_op_has_cases``.
"""

from __future__ import annotations

import pytest
import torch
from torch._library.custom_ops import OPDEFS

import rlloss.kernels.ops  # noqa: F401  (registers the ops)
from rlloss._constants import AGGREGATION_CODES, KL_KIND_CODES, OBJECTIVE_CODES

ops = torch.ops.rlloss
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _logp(b, t, dtype, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    x = (-torch.rand(b, t, generator=gen) * 3).to(dtype)
    return x.requires_grad_(grad)


def _mask(b, t, seed=1):
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=gen) > 0.3
    m[0] = False  # an empty row
    return m


def _ppo(**kw):
    base = dict(objective=OBJECTIVE_CODES["ppo"], dual_or_low=True, delta_or_high=False,
                params=[0.8, 1.28, 3.0, 0.0], row_stat=0)
    base.update(kw)
    return base


def policy_loss_cases():
    for name, dtype in DTYPES.items():
        for b, t in ((1, 1), (3, 17)):
            logp = _logp(b, t, dtype)
            old = _logp(b, t, dtype, seed=2, grad=False)
            ref = _logp(b, t, dtype, seed=3, grad=False)
            adv = torch.randn(b, generator=torch.Generator().manual_seed(4)).to(dtype)
            mask = _mask(b, t)
            sw = _ppo()
            yield f"{name}-{b}x{t}-token", ops.policy_loss, (
                logp, old, adv, mask, ref, None, None, None, sw["objective"], sw["dual_or_low"], sw["delta_or_high"],
                sw["params"], sw["row_stat"], 0.04, KL_KIND_CODES["k3"], False, 20.0,
                AGGREGATION_CODES["seq_mean_token_mean"], 1.0, -1.0, -1.0, 1, True)
            yield f"{name}-{b}x{t}-gspo-counts", ops.policy_loss, (
                logp, None, adv, mask, None, torch.ones(b, t, dtype=dtype), torch.tensor(7.0), None, sw["objective"],
                False, False, [0.9997, 1.0004, 0.0, 0.0], 1, 0.0, KL_KIND_CODES["k3"], False, 20.0,
                AGGREGATION_CODES["token_mean"], 1.0, -1.0, 4.0, 2, True)
            adv_t = torch.randn(b, t, generator=torch.Generator().manual_seed(5)).to(dtype)
            yield f"{name}-{b}x{t}-gmpo-weights", ops.policy_loss, (
                logp, old, adv_t, mask, ref, torch.rand(b, t).to(dtype), None, None, OBJECTIVE_CODES["gmpo"], False,
                False, [0.4, 0.4, 0.0, 0.0], 3, 0.04, KL_KIND_CODES["k3"], True, 20.0,
                AGGREGATION_CODES["seq_mean_token_mean"], 1.0, -1.0, -1.0, 1, True)
            yield f"{name}-{b}x{t}-gspo-seq-bias", ops.policy_loss, (
                logp, old, adv, mask, ref, None, None, None, sw["objective"], False, False,
                [0.9997, 1.0004, 0.0, 0.0], 1, 0.04, KL_KIND_CODES["k2"], True, 20.0,
                AGGREGATION_CODES["seq_mean_token_mean"], 1.0, -1.0, -1.0, 1, True)


def other_cases():
    for name, dtype in DTYPES.items():
        logp = _logp(3, 17, dtype)
        ref = _logp(3, 17, dtype, seed=3, grad=False)
        adv = torch.randn(3, 17).to(dtype)
        mask = _mask(3, 17)
        sw = _ppo()
        yield f"{name}", ops.objective_surrogate, (logp, ref, adv, mask, sw["objective"], sw["dual_or_low"],
                                                   sw["delta_or_high"], sw["params"], 0, 20.0, True)
        yield f"{name}-vespo", ops.objective_surrogate, (logp, ref, adv[:, 0].contiguous(), mask,
                                                         OBJECTIVE_CODES["vespo"], False, False, [2.0, 3.0, 3.0, 2.0],
                                                         2, 20.0, True)
        yield f"{name}", ops.kl_estimate, (logp, ref, KL_KIND_CODES["k3+"], True)
        g = torch.rand(3, 17, dtype=torch.float32)
        yield f"{name}", ops.scale_by_stored_grad, (g, torch.randn(3, 17), dtype)
        x = torch.randn(2, 5, 7).to(dtype).requires_grad_(True)
        m = torch.rand(2, 5, 7) > 0.4
        yield f"{name}-all", ops.masked_mean, (x, m, None, None, -1.0)
        yield f"{name}-dim1", ops.masked_mean, (x, m, 1, None, 4.0)
        yield f"{name}-dim2-tensor", ops.masked_mean, (x, m, 2, torch.full((2, 5), 3.0), 0.0)
        yield f"{name}", ops.masked_mean_backward, (torch.randn(2, 7), m, torch.full((14,), 2.0), 1, dtype)
        logits = torch.randn(2, 5, 33).to(dtype).requires_grad_(True)
        ids = torch.randint(0, 33, (2, 5))
        yield f"{name}-entropy", ops.token_logprobs, (logits, ids, 0.7, True, False)
        yield f"{name}-logp", ops.token_logprobs, (logits, ids, 1.0, False, False)
        lse = torch.logsumexp(logits.detach().float(), -1)
        ent = torch.rand(2, 5)
        yield f"{name}", ops.token_logprobs_backward, (logits.detach(), ids, lse, ent, torch.randn(2, 5),
                                                       torch.randn(2, 5), 0.7)
        yield f"{name}", ops.token_logprobs_backward_, (logits.detach().clone(), ids, lse, ent, torch.randn(2, 5), None,
                                                        1.0)
    rewards = torch.randn(12).requires_grad_(True)
    ids = torch.tensor([3, 1, 3, 3, 2, 1, 2, 2, 9, 1, 3, 2])
    for scale in (0, 1, 2):
        yield f"size-scale{scale}", ops.group_advantages, (rewards, None, 4, False, scale, 1e-6, False)
        yield f"ids-scale{scale}-loo", ops.group_advantages, (rewards, ids, 0, True, scale, 1e-6, True)
    adv, stats, batch = ops.group_advantages(rewards.detach(), None, 4, False, 0, 1e-6, False)
    yield "size", ops.group_advantages_backward, (torch.randn(12), rewards.detach(), None, 4, adv, stats, batch,
                                                  False, 0, 1e-6, False)
    yield "size", ops.dynamic_sampling_mask, (torch.tensor([1.0, 1.0, 0.0, 1.0]), None, 2)
    yield "ids", ops.dynamic_sampling_mask, (torch.tensor([1, 1, 0, 1, 5]), torch.tensor([0, 1, 0, 1, 7]), 0)
    yield "ints", ops.soft_overlong_penalty, (torch.tensor([0, 10, 17, 30]), 20.0, 8.0, 1.0)
    yield "floats", ops.soft_overlong_penalty, (torch.tensor([0.0, 12.5, 30.0]), 20.0, 8.0, 0.5)
    for name, dtype in DTYPES.items():
        logits = torch.randn(3, 6, 41).to(dtype).requires_grad_(True)
        ids = torch.randint(0, 41, (3, 6))
        mask = _mask(3, 6)
        old, adv = _logp(3, 6, torch.float32, seed=2, grad=False), torch.randn(3)
        sw = _ppo()
        args = (logits, ids, mask, old, adv, old - 0.1, None, None, None, 0.8, 0.01, False, sw["objective"],
                sw["dual_or_low"], sw["delta_or_high"], sw["params"], 0, 0.04, KL_KIND_CODES["k3"], False, 20.0,
                AGGREGATION_CODES["token_mean"], 1.0, -1.0, -1.0, 1, True)
        yield name, ops.policy_loss_from_logits, args
        _, _, lse, ent, g, factor, row_factor = ops.policy_loss_from_logits(*args)
        bwd = (ids, mask, lse, ent, g, torch.tensor(1.0), factor, row_factor, 0.8, 0.01)
        yield name, ops.policy_loss_from_logits_backward, (logits.detach(),) + bwd
        yield name, ops.policy_loss_from_logits_backward_, (logits.detach().clone(),) + bwd
    pl = list(policy_loss_cases())[0][2]
    loss, metrics, g, factor, row_factor = ops.policy_loss(*pl)
    yield "bf16-buffer", ops.policy_loss_backward, (g.detach(), torch.tensor(1.5), factor, row_factor,
                                                    pl[0].dtype)


def linear_cases():
    """The loss from hidden states: ``rlloss::linear_*`` (N=70 tokens, H=17, V=131: no block multiple;
    tiles of 70 and, with ``rows=32``, three chunks)."""
    gen = torch.Generator().manual_seed(8)
    n, h_dim, v = 70, 17, 131
    valid = torch.rand(n, generator=gen) > 0.3
    h = torch.where(valid[:, None], torch.randn(n, h_dim, generator=gen), 0.0)  # opcheck: keep outputs finite
    w, b = torch.randn(v, h_dim, generator=gen) * 0.3, torch.randn(v, generator=gen)
    ids = torch.where(valid, torch.randint(0, v, (n,), generator=gen), -100)
    lse, ent, gl, ge = (torch.randn(n, generator=gen) for _ in range(4))
    grad = (h.clone().requires_grad_(True), w.clone().requires_grad_(True), b.clone().requires_grad_(True))
    yield "bias", ops.linear_logprobs, (*grad, ids, valid, 0.9, n)
    yield "3-chunks", ops.linear_logprobs, (*grad, ids, valid, 0.9, 32)
    yield "bias", ops.linear_logprobs_backward, (h, w, b, ids, valid, lse, ent, gl, ge, 0.9, 32, True, True)
    yield "logp-only", ops.linear_logprobs_backward, (h, w, None, ids, valid, lse, ent, gl, None, 0.9, n, True, True)
    yield "frozen-head", ops.linear_logprobs_backward, (h, w, b, ids, valid, lse, ent, gl, ge, 0.9, n, True, False)
    yield "frozen-hidden", ops.linear_logprobs_backward, (h, w, b, ids, valid, lse, ent, gl, ge, 0.9, n, False, True)
    tile = h @ w.T
    yield "bias", ops.linear_tile_stats, (tile, b, ids, valid, 0.9)
    yield "fp32", ops.linear_tile_grad_, (tile.clone(), b, ids, valid, lse, ent, gl, ge, 0.9, torch.float32)
    yield "bf16-half", ops.linear_tile_grad_, (tile.clone(), None, ids, valid, lse, ent, gl, None, 0.9, torch.bfloat16)
    # the loss path: DAPO's clip, token mean, an entropy bonus; [B, T] = [7, 10]
    B, T = 7, 10
    mask, ids2 = valid.view(B, T), ids.view(B, T)
    old, adv = -torch.rand(B, T, generator=gen) * 3, torch.randn(B, generator=gen)
    scale = mask.float() / mask.sum()
    loss_args = dict(objective=0, dual_or_low=False, delta_or_high=False, params=[0.8, 1.28, 0.0, 0.0], row_stat=0,
                     beta=0.0, kl_kind=2, kl_bias_correction=False, max_log_ratio=20.0, aggregation=0, max_tokens=1.0,
                     num_tokens_value=-1.0, num_seqs_value=-1.0, dp_size=1)
    hidden3 = grad[0].detach().view(B, T, h_dim).clone().requires_grad_(True)
    yield "dapo", ops.linear_policy_loss, (hidden3, grad[1], grad[2], ids2, mask, old, adv, None, None, scale, None,
                                           None, 0.9, 0.01, 32, True, True, *loss_args.values())
    yield "frozen-head", ops.linear_policy_loss, (hidden3, w, None, ids2, mask, None, adv, None, None, scale, None,
                                                  None, 1.0, 0.0, n, True, False, *loss_args.values())
    yield "scalar", ops.scale_by_scalar, (torch.randn(5, 3, generator=gen), torch.tensor(1.5), torch.bfloat16)


CASES = list(policy_loss_cases()) + list(other_cases()) + list(linear_cases())


def _id(case):
    return f"{case[1]._qualified_op_name.split('::')[-1]}-{case[0]}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_every_op_has_cases():
    registered = {name.split("::")[1] for name in OPDEFS if name.startswith("rlloss::")}
    covered = {case[1]._qualified_op_name.split("::")[-1] for case in CASES}
    assert registered, "no rlloss ops registered"
    assert registered <= covered, f"ops without an opcheck case: {sorted(registered - covered)}"
