"""Values worked out by hand from the papers' formulas (never computed by the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

import rlloss
from helpers import BACKENDS, DEVICE


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


# --- DAPO soft overlong penalty at the paper's L_max=20480, L_cache=4096 -------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_overlong_penalty_three_pieces_at_dapo_values(backend):
    lengths = torch.tensor([0, 16384, 16385, 18432, 20480, 20481, 30000], device=DEVICE)
    got = rlloss.soft_overlong_penalty(lengths, max_len=20480, cache_len=4096, backend=backend)
    # free up to 20480-4096=16384; then (16384 - L)/4096; beyond 20480 the full -1.
    expected = t([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0, -1.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_overlong_penalty_factor_scales_every_piece(backend):
    lengths = torch.tensor([10, 15, 25], device=DEVICE)
    got = rlloss.soft_overlong_penalty(lengths, max_len=20, cache_len=10, factor=0.5, backend=backend)
    torch.testing.assert_close(got, t([0.0, -0.25, -0.5]))


# --- GRPO vs Dr. GRPO advantages ------------------------------------------------------------

def test_grpo_and_dr_grpo_advantages_on_one_group():
    rewards = t([1.0, 0.0, 0.0, 1.0])
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    grpo = rlloss.group_advantages(rewards, group_size=4, eps=1e-12)
    torch.testing.assert_close(grpo, t([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]))
    dr = rlloss.group_advantages(rewards, group_size=4, scale="none")
    torch.testing.assert_close(dr, t([0.5, -0.5, -0.5, 0.5]))


def test_eps_enters_the_denominator_as_trl_and_verl_do():
    rewards = t([2.0, 0.0])  # std = sqrt(2)
    got = rlloss.group_advantages(rewards, group_size=2, eps=1e-4)
    torch.testing.assert_close(got, t([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)]))


def test_leave_one_out_baseline():
    rewards = t([3.0, 0.0, 0.0])
    got = rlloss.group_advantages(rewards, group_size=3, baseline="loo", scale="none")
    torch.testing.assert_close(got, t([3.0, -1.5, -1.5]))


def test_batch_scale_uses_the_std_of_all_rewards():
    rewards = t([1.0, 0.0, 3.0, 3.0])
    batch_std = float(torch.tensor([1.0, 0.0, 3.0, 3.0]).std())  # torch.std of the literal batch
    got = rlloss.group_advantages(rewards, group_size=2, scale="batch", eps=1e-12)
    torch.testing.assert_close(got, t([0.5 / batch_std, -0.5 / batch_std, 0.0, 0.0]))


def test_group_ids_in_any_order_match_contiguous_groups():
    rewards = t([1.0, 5.0, 0.0, 7.0])
    ids = torch.tensor([9, 4, 9, 4], device=DEVICE)
    got = rlloss.group_advantages(rewards, ids, scale="none")
    torch.testing.assert_close(got, t([0.5, -1.0, -0.5, 1.0]))


def test_singletons_zero_or_keep():
    rewards = t([4.0, 1.0, 3.0])
    ids = torch.tensor([0, 1, 1], device=DEVICE)
    zero = rlloss.group_advantages(rewards, ids, scale="none")
    keep = rlloss.group_advantages(rewards, ids, scale="none", singleton="keep")
    torch.testing.assert_close(zero, t([0.0, -1.0, 1.0]))
    torch.testing.assert_close(keep, t([4.0, -1.0, 1.0]))


def test_all_equal_group_gives_zero_advantage_and_zero_gradient():
    rewards = t([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]).requires_grad_(True)
    adv = rlloss.group_advantages(rewards, group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3, device=DEVICE))
    adv[:3].sum().backward()
    assert torch.equal(rewards.grad, torch.zeros(6, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_sampling_keeps_groups_with_mixed_rewards(backend):
    rewards = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    got = rlloss.dynamic_sampling_mask(rewards, group_size=3, backend=backend)
    assert got.tolist() == [False] * 3 + [True] * 3 + [False] * 3


# --- k3 KL --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "x, expected",  # x = ref_logp - logp; k3 = e^x - x - 1
    [(0.0, 0.0), (math.log(2), 1 - math.log(2)), (-math.log(2), 0.5 + math.log(2) - 1), (30.0, math.exp(20) - 21)],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_at_hand_points(x, expected, backend):
    logp = t([-1.0])
    got = rlloss.k3_kl(logp, logp + x, backend=backend)
    torch.testing.assert_close(got, t([expected]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k1_k2(backend):
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    torch.testing.assert_close(rlloss.kl_estimate(logp, ref, kind="k1", backend=backend), t([0.5, -1.0]))
    torch.testing.assert_close(rlloss.kl_estimate(logp, ref, kind="k2", backend=backend), t([0.125, 0.5]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_gradient_is_one_minus_ref_over_pi(backend):
    logp = t([-1.0, -2.0]).requires_grad_(True)
    ref = t([-1.5, -1.0])
    rlloss.k3_kl(logp, ref, backend=backend).sum().backward()
    # d/dlogp (e^(ref-logp) - (ref-logp) - 1) = 1 - e^(ref-logp)
    torch.testing.assert_close(logp.grad, t([1 - math.exp(-0.5), 1 - math.exp(1.0)]))


# --- clipped surrogate -----------------------------------------------------------------------

def _surrogate_and_grad(d, adv, backend, **kw):
    old = t([[-1.0] * len(d)])
    logp = (old + t([d])).requires_grad_(True)
    leaf = logp.detach().requires_grad_(True)
    loss = rlloss.clipped_surrogate(leaf, old, t(adv), backend=backend, **kw)
    loss.sum().backward()
    return loss[0], leaf.grad[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_clip_cases(backend):
    e = math.exp(0.5)
    # A>0, r=e^0.5 > 1.2: clipped to -1.2, no gradient.  A<0, r=e^-0.5 < 0.8: clipped to 0.8, none.
    # A<0, r=e^0.5: the unclipped -r*A is larger, kept: l = e^0.5, dl/dlogp = -A*r = e^0.5.
    # A>0, r=e^0.1 inside: l = -r, dl/dlogp = -r.
    loss, grad = _surrogate_and_grad([0.5, -0.5, 0.5, 0.1], [[1.0, -1.0, -1.0, 1.0]], backend)
    torch.testing.assert_close(loss, t([-1.2, 0.8, e, -math.exp(0.1)]))
    torch.testing.assert_close(grad, t([0.0, 0.0, e, -math.exp(0.1)]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_higher_decouples_the_bounds(backend):
    loss, grad = _surrogate_and_grad([0.25], [[1.0]], backend, eps_low=0.2, eps_high=0.28)
    # r = e^0.25 = 1.284 > 1.28: clipped at 1.28
    torch.testing.assert_close(loss, t([-1.28]))
    torch.testing.assert_close(grad, t([0.0]))
    loss, grad = _surrogate_and_grad([0.2], [[1.0]], backend, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, t([-math.exp(0.2)]))  # 1.2214 < 1.28: not clipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_bounds_negative_advantages(backend):
    loss, grad = _surrogate_and_grad([1.0, 1.0], [[-1.0, 1.0]], backend, dual_clip=2.0)
    # A<0: l = min(e^1, 2) = 2, no gradient. A>0: -clip = -1.2, untouched by the dual clip.
    torch.testing.assert_close(loss, t([2.0, -1.2]))
    torch.testing.assert_close(grad, t([0.0, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_ratio_clamp_zeroes_the_gradient_past_it(backend):
    loss, grad = _surrogate_and_grad([25.0], [[-1.0]], backend, max_log_ratio=20.0)
    torch.testing.assert_close(loss, t([math.exp(20.0)]))
    torch.testing.assert_close(grad, t([0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gspo_ratio_is_the_row_mean_log_ratio(backend):
    old = t([[-1.0, -2.0, -3.0]])
    leaf = (old + t([[0.3, -0.1, 5.0]])).requires_grad_(True)
    mask = torch.tensor([[True, True, False]], device=DEVICE)
    loss = rlloss.clipped_surrogate(leaf, old, t([1.0]), mask, eps_low=0.2, level="sequence", backend=backend)
    s = math.exp((0.3 - 0.1) / 2)  # masked mean of the log-ratio over the 2 valid tokens
    torch.testing.assert_close(loss, t([[-s, -s, 0.0]]))
    loss.sum().backward()
    torch.testing.assert_close(leaf.grad, t([[-s, -s, 0.0]]))


# --- aggregations on a 2x3 example -----------------------------------------------------------

# per-token losses l and a mask; old_logp=None makes the loss value -A per token, so adv = -l
L = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[True, True, False], [True, False, False]]


@pytest.mark.parametrize(
    "aggregation, extra, expected, row_weights",  # row_weights: each valid token's weight in the loss, per row
    [
        ("token_mean", {}, (1 + 2 + 4) / 3, (1 / 3, 1 / 3)),
        ("seq_mean_token_mean", {}, ((1 + 2) / 2 + 4 / 1) / 2, (1 / 4, 1 / 2)),
        ("seq_mean_token_sum", {}, ((1 + 2) + 4) / 2, (1 / 2, 1 / 2)),
        ("constant", {"max_tokens": 3}, (1 + 2 + 4) / (2 * 3), (1 / 6, 1 / 6)),
        ("token_mean", {"num_tokens": 14}, 7 / 14, (1 / 14, 1 / 14)),
        ("seq_mean_token_mean", {"num_seqs": 4}, 5.5 / 4, (1 / 8, 1 / 4)),
        ("constant", {"max_tokens": 3, "num_seqs": 4}, 7 / 12, (1 / 12, 1 / 12)),
        ("token_mean", {"dp_size": 2}, 2 * 7 / 3, (2 / 3, 2 / 3)),
        ("token_sum", {"dp_size": 3}, 3 * 7, (3, 3)),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregation_on_2x3(aggregation, extra, expected, row_weights, backend):
    # on-policy the per-token loss -A * r has the gradient -A = l per token: d loss / d logp = l * its weight
    logp = t([[-1.0] * 3] * 2).requires_grad_(True)
    out = rlloss.policy_loss(logp, None, -t(L), torch.tensor(M, device=DEVICE), aggregation=aggregation,
                             backend=backend, **extra)
    torch.testing.assert_close(out.loss, t(expected))
    (grad,) = torch.autograd.grad(out.loss, logp)
    want = [[L[i][j] * row_weights[i] if M[i][j] else 0.0 for j in range(3)] for i in range(2)]
    torch.testing.assert_close(grad, t(want))


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_zero_is_not_gradient_zero(backend):
    logp = t([[-1.0, -2.0], [-1.5, -0.5]]).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    out = rlloss.policy_loss(logp, None, t([1.0, -1.0]), mask, backend=backend)
    assert out.loss.item() == 0.0  # -A averaged over tokens: (-1 -1 +1 +1)/4
    out.loss.backward()
    # d/dlogp of -A * r / N_tok with r = 1 on-policy: -A/4
    torch.testing.assert_close(logp.grad, t([[-0.25, -0.25], [0.25, 0.25]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_count_clipped_tokens(backend):
    old = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logp = old + t([[0.5, -0.5, 0.0, 0.5, 0.4]])
    adv = t([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool, device=DEVICE)
    m = rlloss.policy_loss(logp, old, adv, mask, dual_clip=1.5, backend=backend).metrics
    assert m["clip_high"].item() == pytest.approx(0.4)  # tokens 0 and 4: r=1.65, 1.49 > 1.2, A>0
    assert m["clip_low"].item() == pytest.approx(0.2)  # token 1: r=0.61 < 0.8, A<0
    assert m["clip_dual"].item() == pytest.approx(0.2)  # token 3: r=1.65 > c=1.5, A<0
    expected_ratio = (2 * math.exp(0.5) + math.exp(-0.5) + 1 + math.exp(0.4)) / 5
    assert m["ratio_mean"].item() == pytest.approx(expected_ratio, rel=1e-6)
    assert "kl_mean" not in m


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_with_constant_normalizer_and_empty(backend):
    x = t([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]], device=DEVICE)
    torch.testing.assert_close(rlloss.masked_mean(x, mask, backend=backend), t(8 / 3))
    torch.testing.assert_close(rlloss.masked_mean(x, mask, dim=1, backend=backend), t([1.0, 3.5]))
    torch.testing.assert_close(rlloss.masked_mean(x, mask, normalizer=16, backend=backend), t(0.5))
    empty = torch.zeros_like(mask)
    torch.testing.assert_close(rlloss.masked_mean(x, empty, backend=backend), t(0.0))
    # d mean / d x = mask / count, 0 at masked positions; per row with dim=1: 1 / the row's count
    leaf = x.clone().requires_grad_(True)
    (rlloss.masked_mean(leaf, mask, backend=backend) + rlloss.masked_mean(leaf, mask, dim=1, backend=backend).sum()
     ).backward()
    torch.testing.assert_close(leaf.grad, t([[1 / 3 + 1.0, 0.0], [1 / 3 + 0.5, 1 / 3 + 0.5]]))
