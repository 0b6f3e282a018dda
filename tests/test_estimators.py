"""The advantage estimators beyond GRPO (``rlloss.advantages`` and ``rlloss.returns``): whiten, discounted returns,
REINFORCE++ (and its baseline variant), ReMax, OPO, GPG, pass@k, GDPO, optimal token baseline.

Hand-worked values (every expected number written out from the formula, never computed by the
code under test), the edge cases that decide numbers (singleton groups under both conventions,
ties for the best sample in pass@k, empty rows, all-masked inputs), properties (whiten's moments,
returns against a sequential loop, permutation equivariance, masked positions never matter), bad
input, and ``torch.compile(fullgraph=True)`` of every reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlloss
from strategies import MASK_KINDS, make_mask
from helpers import DEVICE
from rlloss import advantages as A
from rlloss import returns as R
from rlloss._groups import group_index

NAN = math.nan
F64 = torch.float64


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def b(x):
    return torch.tensor(x, dtype=torch.bool, device=DEVICE)


def ids(x):
    return torch.tensor(x, dtype=torch.long, device=DEVICE)


def close(got, want, **kw):
    torch.testing.assert_close(got, want, **kw)


# =============================================================================================
# whiten, discounted returns, REINFORCE++, ReMax
# =============================================================================================

def test_whiten_by_hand():
    # valid 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1)/2 = 1.
    x = t([[1.0, 2.0], [3.0, NAN]], F64)
    mask = b([[True, True], [True, False]])
    s = math.sqrt(1 + 1e-8)
    close(rlloss.whiten(x, mask), t([[-1 / s, 0.0], [1 / s, 0.0]], F64))
    # one valid token: var = 0 (verl raises), so 0 / sqrt(1e-8) = 0; none: all zeros
    close(rlloss.whiten(x, b([[False, True], [False, False]])), t([[0.0, 0.0], [0.0, 0.0]], F64), rtol=0, atol=0)
    close(rlloss.whiten(x, b([[False, False], [False, False]])), t([[0.0, 0.0], [0.0, 0.0]], F64), rtol=0, atol=0)


def test_whiten_gradient_is_finite_with_nan_at_masked_positions():
    x = t([[1.0, 2.0, NAN], [4.0, NAN, NAN]]).requires_grad_(True)
    mask = b([[True, True, False], [True, False, False]])
    (rlloss.whiten(x, mask) * t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool((x.grad[~mask] == 0).all())


REWARDS = [[0.0, 0.0, 1.0, 9.0], [0.0, 2.0, 9.0, 9.0], [1.0, 9.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]]
REWARD_MASK = [[True, True, True, False], [True, True, False, False], [True, False, True, True],
               [False, False, False, False]]


def test_discounted_returns_by_hand():
    r, m = t(REWARDS), b(REWARD_MASK)
    # gamma = 1: the reward-to-go over valid tokens; the masked 9s never count.
    close(rlloss.discounted_returns(r, m), t([[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 0.0, 0.0], [4.0, 0.0, 3.0, 3.0],
                                             [0.0, 0.0, 0.0, 0.0]]), rtol=0, atol=0)
    # gamma = 0.5; row 2: G3 = 3, G2 = 0 + 1.5, the masked position passes 1.5 on undiscounted, G0 = 1 + 0.75.
    close(rlloss.discounted_returns(r, m, gamma=0.5), t([[0.25, 0.5, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0],
                                                         [1.75, 0.0, 1.5, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    # gamma = 0: each token's own reward
    close(rlloss.discounted_returns(r, m, gamma=0.0), torch.where(m, r, 0.0))


def test_reinforce_pp_by_hand():
    # returns [[1, 1, 1], [0, 0, 0]]: mean 0.5, unbiased variance 6 * 0.25 / 5 = 0.3
    r = t([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], F64)
    m = b([[True, True, True], [True, True, True]])
    s = math.sqrt(0.3 + 1e-8)
    close(rlloss.reinforce_pp_advantages(r, m), t([[0.5 / s] * 3, [-0.5 / s] * 3], F64))
    # gamma = 0.5: returns [[0.25, 0.5, 1], [0, 0, 0]], whitened with their mean and unbiased variance
    g = [0.25, 0.5, 1.0, 0.0, 0.0, 0.0]
    mean = sum(g) / 6
    s = math.sqrt(sum((x - mean) ** 2 for x in g) / 5 + 1e-8)
    close(rlloss.reinforce_pp_advantages(r, m, gamma=0.5), t([[(x - mean) / s for x in g[:3]],
                                                              [(x - mean) / s for x in g[3:]]], F64))


def test_remax_by_hand():
    # row 0: G = [1, 1, 1], baseline 0.25; row 1 (an interior masked token): G = [1, 0.5, -, 0.5], baseline 1.
    r = t([[0.0, 0.0, 1.0, NAN], [0.5, 0.0, NAN, 0.5]])
    m = b([[True, True, True, False], [True, True, False, True]])
    close(rlloss.remax_advantages(r, m, t([0.25, 1.0])), t([[0.75, 0.75, 0.75, 0.0], [0.0, -0.5, 0.0, -0.5]]))


# =============================================================================================
# Group baselines
# =============================================================================================

def test_reinforce_pp_baseline_by_hand():
    # centred: group 0 [1, 0] -> [0.5, -0.5]; group 1 [3, 5] -> [-1, 1]. Lengths 2, 1, 1, 0.
    # valid tokens 0.5, 0.5, -0.5, -1: mean -0.125, deviations .625 .625 -.375 -.875, variance 1.6875/3 = .5625.
    m = b([[True, True], [True, False], [True, False], [False, False]])
    s = math.sqrt(0.5625 + 1e-8)
    got = rlloss.reinforce_pp_baseline_advantages(t([1.0, 0.0, 3.0, 5.0], F64), mask=m, group_size=2)
    close(got, t([[0.625 / s, 0.625 / s], [-0.375 / s, 0.0], [-0.875 / s, 0.0], [0.0, 0.0]], F64))


def test_reinforce_pp_baseline_singletons():
    scores, g, m = t([1.0, 3.0, 5.0], F64), ids([0, 0, 1]), b([[True], [True], [True]])
    # zero: centred [-1, 1, 0], mean 0, variance 1
    s = math.sqrt(1 + 1e-8)
    close(rlloss.reinforce_pp_baseline_advantages(scores, g, m), t([[-1 / s], [1 / s], [0.0]], F64))
    # keep: [-1, 1, 5], mean 5/3, deviations -8/3 -2/3 10/3, variance (64 + 4 + 100)/9/2 = 84/9
    s = math.sqrt(84 / 9 + 1e-8)
    close(rlloss.reinforce_pp_baseline_advantages(scores, g, m, singleton="keep"),
          t([[-8 / 3 / s], [-2 / 3 / s], [10 / 3 / s]], F64))


def test_opo_by_hand():
    # group 0: lengths 3, 1 -> baseline (3*1 + 1*0)/4 = 0.75; group 1: lengths 2, 0 -> (2*2 + 0)/2 = 2.
    m = b([[True, True, True], [True, False, False], [True, True, False], [False, False, False]])
    got = rlloss.opo_advantages(t([1.0, 0.0, 2.0, 2.0]), mask=m, group_size=2)
    close(got, t([[0.25] * 3, [-0.75, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    # a group whose rows are all empty: baseline 0, no NaN
    assert not rlloss.opo_advantages(t([1.0, 2.0]), mask=b([[False], [False]]), group_size=2).any()


def test_opo_singletons():
    m = b([[True, True, True], [True, False, False], [True, False, False]])
    scores, g = t([1.0, 0.0, 7.0]), ids([0, 0, 1])
    close(rlloss.opo_advantages(scores, g, m), t([[0.25] * 3, [-0.75, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    close(rlloss.opo_advantages(scores, g, m, singleton="keep"),
          t([[0.25] * 3, [-0.75, 0.0, 0.0], [7.0, 0.0, 0.0]]))


def test_gpg_by_hand():
    # 3 non-zero scores of 6: alpha = 2. Group 0 [1, 0] -> 2 * [0.5, -0.5]; groups [0, 0] and [2, 2] -> 0.
    m = torch.ones(6, 2, dtype=torch.bool, device=DEVICE)
    got = rlloss.gpg_advantages(t([1.0, 0.0, 0.0, 0.0, 2.0, 2.0]), mask=m, group_size=2)
    close(got, t([[1.0] * 2, [-1.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2]))
    # singletons: 2 non-zero of 3, alpha = 1.5; keep gives alpha * s = 4.5
    m3, g = torch.ones(3, 1, dtype=torch.bool, device=DEVICE), ids([0, 0, 1])
    close(rlloss.gpg_advantages(t([1.0, 0.0, 3.0]), g, m3), t([[0.75], [-0.75], [0.0]]))
    close(rlloss.gpg_advantages(t([1.0, 0.0, 3.0]), g, m3, singleton="keep"), t([[0.75], [-0.75], [4.5]]))
    # all scores zero: alpha = N / max(0, 1), advantages 0
    assert not rlloss.gpg_advantages(t([0.0, 0.0]), mask=m3[:2], group_size=2).any()


@pytest.mark.parametrize("singleton", ["zero", "keep"])
def test_gpg_with_negative_scores_matches_a_float64_loop(singleton):
    """Scores of both signs (verl's rewards may be -1 / +1): alpha counts every non-zero score, negative ones
    too. SPEC's ``alpha * (s_i - mean_g s)``, ``alpha = N / max(#{s != 0}, 1)``, as a loop over Python floats."""
    scores = [-1.0, 0.0, 2.0, -0.5, 0.0, 0.0, -3.0, 1.0, 4.0]
    groups = [0, 0, 0, 1, 1, 2, 2, 2, 3]  # group 3 a singleton
    lengths = [2, 3, 1, 3, 2, 3, 1, 2, 3]
    alpha = len(scores) / max(sum(1 for s in scores if s != 0), 1)  # 6 non-zero of 9, 3 of them negative
    want = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        if len(members) == 1:
            adv = alpha * s if singleton == "keep" else 0.0
        else:
            adv = alpha * (s - sum(members) / len(members))
        want.append([adv if t < lengths[i] else 0.0 for t in range(3)])
    mask = torch.arange(3)[None] < torch.tensor(lengths)[:, None]
    got = rlloss.gpg_advantages(t(scores, F64), ids(groups), mask.to(DEVICE), singleton=singleton)
    close(got, t(want, F64))


def test_passk_by_hand():
    # group 0 [1, 0, 3, 2]: only the 3 gets 3 - 2 = 1 (std sqrt(5/3)); group 1 [3, 1, 3]: a tie for
    # the best gives 0; group 2 [5, 5]: a tie again. Ids in any order.
    scores = t([1.0, 3.0, 0.0, 1.0, 3.0, 5.0, 2.0, 3.0, 5.0], F64)
    g = ids([0, 1, 0, 1, 0, 2, 0, 1, 2])
    m = torch.ones(9, 2, dtype=torch.bool, device=DEVICE)
    m[4, 1] = False
    want_none = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    got = rlloss.passk_advantages(scores, g, m, scale="none")
    close(got, t(want_none, F64)[:, None].expand(9, 2) * m)
    got = rlloss.passk_advantages(scores, g, m)
    want = 1.0 / (math.sqrt(5 / 3) + 1e-6)
    close(got, t([w * want for w in want_none], F64)[:, None].expand(9, 2) * m)
    # ties with the smallest eps: 0, never 0/0; eps is unused (may be 0) without the std
    assert not rlloss.passk_advantages(t([2.0, 2.0]), mask=m[:2], group_size=2, eps=1e-30).any()
    assert not rlloss.passk_advantages(t([2.0, 2.0]), mask=m[:2], group_size=2, scale="none", eps=0.0).any()


def test_gdpo_by_hand():
    # reward 0: group 0 [1, 0] -> +-0.5/(sqrt(.5)+eps), group 1 [1, 1] -> 0;
    # reward 1: group 0 [0, 2] -> -+1/(sqrt(2)+eps), group 1 [0, 0] -> 0; weights 1 and 0.5.
    eps = 1e-6
    a = 0.5 / (math.sqrt(0.5) + eps)
    c = 0.5 * 1 / (math.sqrt(2) + eps)
    v = a - c
    s = math.sqrt(2 * v * v / 3 + 1e-8)  # whiten: mean 0, unbiased variance (v^2 + v^2)/3
    m = torch.ones(4, 1, dtype=torch.bool, device=DEVICE)
    scores = t([[1.0, 0.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]], F64)
    got = rlloss.gdpo_advantages(scores, mask=m, group_size=2, weights=[1.0, 0.5])
    close(got, t([[v / s], [-v / s], [0.0], [0.0]], F64))
    close(rlloss.gdpo_advantages(scores, mask=m, group_size=2, weights=t([1.0, 0.5], F64)), got)


def test_gdpo_singletons():
    x = 1 / (math.sqrt(2) + 1e-6)  # group [1, 3]: -+1/(sqrt 2 + eps)
    m, g = torch.ones(3, 1, dtype=torch.bool, device=DEVICE), ids([0, 0, 1])
    scores = t([[1.0, 3.0, 5.0]], F64)
    s = math.sqrt(x * x + 1e-8)  # zero: [-x, x, 0], variance 2x^2/2
    close(rlloss.gdpo_advantages(scores, g, m), t([[-x / s], [x / s], [0.0]], F64))
    mu = 5 / 3  # keep: [-x, x, 5], the singleton keeps its score exactly (std 1, no eps)
    dev = [-x - mu, x - mu, 5 - mu]
    s = math.sqrt(sum(d * d for d in dev) / 2 + 1e-8)
    close(rlloss.gdpo_advantages(scores, g, m, singleton="keep"), t([[d / s] for d in dev], F64))


def _otb_inputs(dtype=F64):
    r = t([[0.0, 0.0, 1.0], [0.0, 2.0, NAN]], dtype)
    m = b([[True, True, True], [True, True, False]])
    old = t([[math.log(0.5)] * 3, [math.log(0.5), math.log(0.5), NAN]], dtype)
    sq = t([[0.5] * 3, [0.5, 0.5, NAN]], dtype)
    return r, m, old, sq


def test_optimal_token_baseline_by_hand():
    # pi = 0.5, sum pi^2 = 0.5: w = 1 - 1 + 0.5 = 0.5 per token. G0 = [1, 1, 1], G1 = [2, 2, -];
    # W0 = [.5, 1, 1.5], W1 = [.5, 1, -]. b_t = sum G W / (sum W + 1e-8).
    r, m, old, sq = _otb_inputs()
    b0, b1, b2 = 1.5 / (1 + 1e-8), 3 / (2 + 1e-8), 1.5 / (1.5 + 1e-8)
    # handle_zero_tail: row 0 is the only longest (3 > 2), its baseline is 0 from position 2 on.
    got = rlloss.optimal_token_baseline_advantages(r, m, old_logp=old, sum_pi_squared=sq, group_size=2)
    close(got, t([[1 - b0, 1 - b1, 1.0], [2 - b0, 2 - b1, 0.0]], F64))
    got = rlloss.optimal_token_baseline_advantages(r, m, old_logp=old, sum_pi_squared=sq, group_size=2,
                                                   handle_zero_tail=False)
    close(got, t([[1 - b0, 1 - b1, 1 - b2], [2 - b0, 2 - b1, 0.0]], F64))
    # is_weights 2: w = 0.5 * 4 = 2, W0 = [2, 4, 6], W1 = [2, 4]
    got = rlloss.optimal_token_baseline_advantages(r, m, old_logp=old, sum_pi_squared=sq, group_size=2,
                                                   is_weights=torch.full_like(r, 2.0), handle_zero_tail=False)
    b0, b1, b2 = 6 / (4 + 1e-8), 12 / (8 + 1e-8), 6 / (6 + 1e-8)
    close(got, t([[1 - b0, 1 - b1, 1 - b2], [2 - b0, 2 - b1, 0.0]], F64))
    # is_weights 2 on row 0, 1 on row 1 (a uniform weight cancels out): w0 = 0.5 * 2^2 = 2, w1 = 0.5;
    # W0 = [2, 4, 6], W1 = [0.5, 1]: b = [(2 + 1) / 2.5, (4 + 2) / 5, 6 / 6]
    weights = torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]], dtype=F64, device=DEVICE)
    got = rlloss.optimal_token_baseline_advantages(r, m, old_logp=old, sum_pi_squared=sq, group_size=2,
                                                   is_weights=weights, handle_zero_tail=False)
    b0, b1, b2 = 3 / (2.5 + 1e-8), 6 / (5 + 1e-8), 6 / (6 + 1e-8)
    close(got, t([[1 - b0, 1 - b1, 1 - b2], [2 - b0, 2 - b1, 0.0]], F64))


def test_optimal_token_baseline_ties_and_singletons():
    r, m, old, sq = _otb_inputs()
    full = b([[True, True, True], [True, True, True]])
    r2 = torch.nan_to_num(r)
    old2, sq2 = torch.nan_to_num(old, nan=math.log(0.5)), torch.nan_to_num(sq, nan=0.5)
    # two rows tied for the longest: no zero tail. G0 = [1, 1, 1], G1 = [2, 2, 0]; W as before for both.
    got = rlloss.optimal_token_baseline_advantages(r2, full, old_logp=old2, sum_pi_squared=sq2, group_size=2)
    b0, b1, b2 = 1.5 / (1 + 1e-8), 3 / (2 + 1e-8), 1.5 / (3 + 1e-8)
    close(got, t([[1 - b0, 1 - b1, 1 - b2], [2 - b0, 2 - b1, -b2]], F64))
    # a third row alone in its group: 0, or its return G = [2, 1, 0] with "keep"
    r3 = torch.cat([r, t([[1.0, 1.0, 0.0]], F64)])
    m3 = torch.cat([m, b([[True, True, True]])])
    old3, sq3 = torch.cat([old, old2[:1]]), torch.cat([sq, sq2[:1]])
    g = ids([0, 0, 1])
    b0, b1 = 1.5 / (1 + 1e-8), 3 / (2 + 1e-8)
    pair = [[1 - b0, 1 - b1, 1.0], [2 - b0, 2 - b1, 0.0]]
    close(rlloss.optimal_token_baseline_advantages(r3, m3, g, old3, sq3), t(pair + [[0.0, 0.0, 0.0]], F64))
    close(rlloss.optimal_token_baseline_advantages(r3, m3, g, old3, sq3, singleton="keep"),
          t(pair + [[2.0, 1.0, 0.0]], F64))


def test_singletons_one_convention_for_every_group_estimator():
    # A sample alone in its group: "zero" gives it 0 (before whitening for the whitened estimators,
    # where it then matches an all-equal group's row), "keep" its raw score, group_advantages included.
    scores, g = t([2.0, 2.0, 4.0]), ids([0, 0, 1])  # group 0 all equal, group 1 a singleton
    m = torch.ones(3, 2, dtype=torch.bool, device=DEVICE)
    assert rlloss.group_advantages(scores, g).tolist() == [0.0, 0.0, 0.0]
    assert rlloss.group_advantages(scores, g, singleton="keep").tolist() == [0.0, 0.0, 4.0]
    for fn in (rlloss.opo_advantages, rlloss.gpg_advantages):
        assert not fn(scores, g, m).any()
        assert fn(scores, g, m, singleton="keep")[2].tolist() != [0.0, 0.0]
    for fn in (rlloss.reinforce_pp_baseline_advantages,):
        out = fn(scores, g, m)
        assert torch.equal(out[2], out[0])  # like the all-equal group
    out = rlloss.gdpo_advantages(scores[None], g, m)
    assert torch.equal(out[2], out[0])


# =============================================================================================
# Properties
# =============================================================================================

@st.composite
def token_problems(draw):
    bsz, tlen = draw(st.integers(1, 6)), draw(st.integers(1, 50))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(bsz, tlen, generator=gen) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    kind = draw(st.sampled_from(MASK_KINDS))
    mask = make_mask(kind, bsz, tlen, gen)
    return x.to(DEVICE, F64), mask.to(DEVICE), kind


def _nan_fill(x, mask):
    return torch.where(mask, x, torch.full_like(x, NAN))


@given(problem=token_problems())
def test_whiten_gives_zero_mean_unit_variance(problem):
    x, mask, _ = problem
    w = rlloss.whiten(x, mask)
    assert torch.equal(w, rlloss.whiten(_nan_fill(x, mask), mask))
    n = int(mask.sum())
    v = w[mask]
    if n >= 2 and float(x[mask].var()) > 1e-4:
        var = float(x[mask].var())
        assert abs(float(v.mean())) < 1e-9
        # the SPEC's +1e-8 under the square root: the variance is exactly var / (var + 1e-8), not 1
        assert abs(float(v.var()) - var / (var + 1e-8)) < 1e-9
    elif n < 2:
        assert not w.any()


def _returns_loop(r, mask, gamma):
    """The spec's backward scan, one position at a time."""
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for j in reversed(range(r.shape[1])):
        m = mask[:, j]
        running = torch.where(m, r[:, j] + gamma * running, running)
        out[:, j] = torch.where(m, running, torch.zeros_like(running))
    return out


@given(problem=token_problems(), gamma=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]))
def test_discounted_returns_match_the_sequential_scan(problem, gamma):
    r, mask, kind = problem
    got = rlloss.discounted_returns(r, mask, gamma=gamma)
    close(got, _returns_loop(r, mask, gamma), rtol=1e-12, atol=1e-9)
    assert torch.equal(got, rlloss.discounted_returns(_nan_fill(r, mask), mask, gamma=gamma))
    if gamma == 1.0 and kind in ("prefix", "full", "all_masked"):  # contiguous: the reverse cumsum
        rev = torch.flip(torch.cumsum(torch.flip(torch.where(mask, r, 0.0), [1]), 1), [1])
        close(got, torch.where(mask, rev, 0.0), rtol=1e-12, atol=1e-9)
    close(rlloss.reinforce_pp_advantages(r, mask, gamma=gamma), rlloss.whiten(got, mask))


@st.composite
def group_problems(draw, min_size=1):
    k = draw(st.integers(1, 4))
    sizes = [draw(st.integers(min_size, 4)) for _ in range(k)]
    n = sum(sizes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    group_ids = torch.repeat_interleave(torch.randperm(50, generator=gen)[:k], torch.tensor(sizes))
    group_ids = group_ids[torch.randperm(n, generator=gen)]
    scores = torch.randint(0, 3, (n,), generator=gen).double() if draw(st.booleans()) else torch.randn(n, generator=gen,
                                                                                                     dtype=F64)
    tlen = draw(st.integers(1, 9))
    mask = torch.arange(tlen)[None] < torch.randint(0, tlen + 1, (n, 1), generator=gen)
    perm = torch.randperm(n, generator=gen)
    return scores.to(DEVICE), group_ids.to(DEVICE), mask.to(DEVICE), perm.to(DEVICE), gen


GROUP_ESTIMATORS = {
    "reinforce_pp_baseline": lambda s, g, m, **kw: rlloss.reinforce_pp_baseline_advantages(s, g, m, **kw),
    "opo": lambda s, g, m, **kw: rlloss.opo_advantages(s, g, m, **kw),
    "gpg": lambda s, g, m, **kw: rlloss.gpg_advantages(s, g, m, **kw),
    "gdpo": lambda s, g, m, **kw: rlloss.gdpo_advantages(torch.stack([s, s * s - 1]), g, m, weights=[1.0, 0.3], **kw),
    "group_advantages": lambda s, g, m, **kw: rlloss.group_advantages(s, g, **kw)[:, None] * m,
}


@given(problem=group_problems(), singleton=st.sampled_from(["zero", "keep"]))
def test_permuting_samples_permutes_advantages(problem, singleton):
    scores, g, mask, perm, gen = problem
    relabel = torch.randperm(100, generator=gen).to(DEVICE)  # group ids renamed too
    for name, fn in GROUP_ESTIMATORS.items():
        out = fn(scores, g, mask, singleton=singleton)
        out_p = fn(scores[perm], relabel[g[perm]], mask[perm], singleton=singleton)
        close(out_p, out[perm], rtol=1e-12, atol=1e-12, msg=name)
    r = torch.randn(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    old = -torch.rand(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    sq = torch.rand(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    out = rlloss.optimal_token_baseline_advantages(r, mask, g, old, sq, singleton=singleton)
    out_p = rlloss.optimal_token_baseline_advantages(r[perm], mask[perm], g[perm], old[perm], sq[perm],
                                                     singleton=singleton)
    close(out_p, out[perm], rtol=1e-12, atol=1e-12)


@given(problem=group_problems(min_size=2), scale=st.sampled_from(["group", "none"]))
def test_passk_permutation_and_one_best_per_group(problem, scale):
    scores, g, mask, perm, _ = problem
    full = torch.ones(scores.shape[0], 1, dtype=torch.bool, device=DEVICE)
    out = rlloss.passk_advantages(scores, g, full, scale=scale)[:, 0]
    close(rlloss.passk_advantages(scores[perm], g[perm], full[perm], scale=scale)[:, 0], out[perm])
    for gid in g.unique():
        members = g == gid
        s = scores[members]
        nonzero = out[members] != 0
        assert int(nonzero.sum()) <= 1
        if nonzero.any():
            assert float(s[nonzero]) == float(s.max())
    close(rlloss.passk_advantages(scores, g, mask, scale=scale), out[:, None] * mask)


@given(problem=group_problems())
def test_masked_positions_never_matter(problem):
    scores, g, mask, _, gen = problem
    r = torch.randn(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    old = -torch.rand(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    sq = torch.rand(mask.shape, generator=gen, dtype=F64).to(DEVICE)
    w = torch.rand(mask.shape, generator=gen, dtype=F64).to(DEVICE) + 0.5
    base = rlloss.optimal_token_baseline_advantages(r, mask, g, old, sq, is_weights=w)
    nan = rlloss.optimal_token_baseline_advantages(_nan_fill(r, mask), mask, g, _nan_fill(old, mask),
                                                   _nan_fill(sq, mask), is_weights=_nan_fill(w, mask))
    assert torch.equal(base, nan)
    assert torch.equal(rlloss.remax_advantages(r, mask, scores), rlloss.remax_advantages(_nan_fill(r, mask), mask,
                                                                                         scores))
    for name, fn in GROUP_ESTIMATORS.items():
        out = fn(scores, g, mask)
        assert not bool(out[~mask].any()), name
        assert not bool(out.isnan().any()), name


def test_gdpo_with_one_reward_is_whitened_grpo():
    gen = torch.Generator().manual_seed(7)
    scores = torch.randn(12, generator=gen, dtype=F64).to(DEVICE)
    mask = (torch.rand(12, 5, generator=gen) < 0.7).to(DEVICE)
    g = ids([0, 1, 2, 3] * 3)
    for singleton in ("zero", "keep"):
        grpo = rlloss.group_advantages(scores, g, singleton=singleton)
        close(rlloss.gdpo_advantages(scores[None], g, mask, singleton=singleton),
              rlloss.whiten(grpo[:, None].expand(12, 5), mask), rtol=1e-12, atol=1e-12)


# =============================================================================================
# Bad input
# =============================================================================================

M2 = torch.ones(4, 3, dtype=torch.bool)
G2 = {"mask": M2, "group_size": 2}  # contiguous pairs of the four rows of M2
Z4 = {"old_logp": t([[0.0]] * 4), "sum_pi_squared": t([[0.0]] * 4), "group_size": 2}


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: rlloss.opo_advantages(t([1.0, NAN, 0.0, 1.0]), **G2), ValueError, "scores must be finite"),
        (lambda: rlloss.gpg_advantages(t([1.0, math.inf, 0.0, 1.0]), **G2), ValueError, "scores must be finite"),
        (lambda: rlloss.gdpo_advantages(t([[1.0, NAN, 0.0, 1.0]]), **G2), ValueError, "scores must be finite"),
        (lambda: rlloss.remax_advantages(t([[1.0]] * 4), M2[:, :1], t([0.0, NAN, 0.0, 0.0])), ValueError,
         "baseline_scores must be finite"),
        (lambda: rlloss.opo_advantages(t([1.0, 0.0, 0.0, 1.0]), mask=M2, group_size=3), ValueError,
         "group_size=3 does not divide"),
        (lambda: rlloss.gpg_advantages(t([1.0, 0.0, 0.0, 1.0]), ids([0, 0, 1]), M2), ValueError,
         r"groups \(group ids\) must have shape"),
        (lambda: rlloss.reinforce_pp_baseline_advantages(t([1.0, 0.0, 0.0, 1.0]), mask=M2[:3], group_size=2),
         ValueError,
         "mask must have one row per sequence"),
        (lambda: rlloss.opo_advantages(t([1.0, 0.0, 0.0, 1.0]), **G2, singleton="one"), ValueError,
         "singleton must be one of"),
        (lambda: rlloss.passk_advantages(t([1.0, 0.0, 0.0, 1.0]), **G2, scale="batch"), ValueError,
         "scale must be one of"),
        (lambda: rlloss.passk_advantages(t([1.0, 0.0, 0.0, 1.0]), mask=M2, group_size=1), ValueError,
         "at least 2 samples"),
        (lambda: rlloss.passk_advantages(t([1.0, 0.0, 0.0, 1.0]), ids([0, 0, 0, 1]), M2), ValueError,
         "at least 2 samples"),
        (lambda: rlloss.passk_advantages(t([1.0, 0.0, 0.0, 1.0]), **G2, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: rlloss.passk_advantages(t([1.0, 0.0, 0.0, 1.0]), **G2, scale="none", eps=-1.0), ValueError,
         "eps must be >= 0"),
        (lambda: rlloss.gdpo_advantages(t([[1.0, 0.0, 0.0, 1.0]]), **G2, eps=0.0), ValueError, "eps must be > 0"),
        (lambda: rlloss.gdpo_advantages(t([[1.0, 0.0, 0.0, 1.0]]), **G2, weights=[1.0, 2.0]), ValueError,
         r"weights must hold one weight per reward \(K=1\)"),
        (lambda: rlloss.gdpo_advantages(t([[1.0, 0.0, 0.0, 1.0]]), **G2, weights=[NAN]), ValueError,
         "weights must be finite"),
        (lambda: rlloss.gdpo_advantages(t([1.0, 0.0, 0.0, 1.0]), **G2), ValueError, "scores must be 2-D"),
        (lambda: rlloss.discounted_returns(t([[1.0, 2.0]]), b([[True, True]]), gamma=1.5), ValueError,
         "gamma must be <= 1"),
        (lambda: rlloss.reinforce_pp_advantages(t([[1.0, 2.0]]), b([[True, True]]), gamma=-0.1), ValueError,
         "gamma must be >= 0"),
        (lambda: rlloss.discounted_returns(t([[1.0, 2.0]]), b([[True]])), ValueError,
         "mask must have the shape of token_rewards"),
        (lambda: rlloss.whiten(torch.tensor([1, 2]), b([True, True])), TypeError, "x must be a floating tensor"),
        (lambda: rlloss.optimal_token_baseline_advantages(t([[1.0]] * 4), M2[:, :1], ids([0, 0, 1]), t([[0.0]] * 4),
                                                          t([[0.0]] * 4)), ValueError, "groups"),
        (lambda: rlloss.optimal_token_baseline_advantages(t([[1.0]] * 4), M2[:, :1],
                                                          **{**Z4, "old_logp": t([[0.0]] * 3)}), ValueError,
         "old_logp must have the shape of token_rewards"),
        (lambda: rlloss.optimal_token_baseline_advantages(t([[1.0]] * 4), M2[:, :1], **Z4, handle_zero_tail=1),
         TypeError,
         "handle_zero_tail must be a bool"),
        (lambda: rlloss.optimal_token_baseline_advantages(t([[1.0]] * 4), M2[:, :1], **Z4, singleton="drop"),
         ValueError,
         "singleton must be one of"),
    ],
)
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_integer_and_bool_scores_are_accepted():
    m = torch.ones(4, 1, dtype=torch.bool, device=DEVICE)
    close(rlloss.opo_advantages(torch.tensor([1, 0, 1, 1], device=DEVICE), mask=m, group_size=2),
          t([[0.5], [-0.5], [0.0], [0.0]]))
    close(rlloss.gpg_advantages(torch.tensor([True, False, True, True], device=DEVICE), mask=m, group_size=2),
          t([[2 / 3], [-2 / 3], [0.0], [0.0]]))


# =============================================================================================
# torch.compile: every reference traces whole (fullgraph=True makes a graph break an error)
# =============================================================================================

def _compile_cases():
    gen = torch.Generator().manual_seed(5)
    n, tlen = 6, 7
    scores = torch.randn(n, generator=gen)
    mask = torch.arange(tlen)[None] < torch.tensor([[7], [3], [0], [5], [7], [2]])
    r = torch.randn(n, tlen, generator=gen)
    old = -torch.rand(n, tlen, generator=gen)
    sq = torch.rand(n, tlen, generator=gen)
    g = torch.tensor([4, 9, 4, 9, 9, 2])  # group ids; 2 is a singleton
    index, k = group_index(g, n, g.device)
    index2, k2 = group_index(3, n, g.device)
    return [
        ("whiten", R._whiten_torch, (r, mask)),
        ("discounted_returns gamma=1", R._discounted_returns_torch, (r, mask, 1.0)),
        ("discounted_returns gamma=0.9", R._discounted_returns_torch, (r, mask, 0.9)),
        ("reinforce_pp_baseline", A._reinforce_pp_baseline_torch, (scores, index, k, mask, "zero")),
        ("remax", R._remax_torch, (r, mask, scores)),
        ("opo", A._opo_torch, (scores, index, k, mask, "keep")),
        ("gpg", A._gpg_torch, (scores, index, k, mask, "zero")),
        ("passk", A._passk_torch, (scores, index2, k2, mask, "group", 1e-6)),
        ("gdpo", A._gdpo_torch, (torch.stack([scores, scores.sin()]), index, k, mask, torch.tensor([1.0, 0.5]),
                                 1e-6, "keep")),
        ("optimal_token_baseline ids", R._optimal_token_baseline_torch,
         (r, mask, index, k, None, old, sq, sq + 0.5, True, "zero")),
        ("optimal_token_baseline contiguous", R._optimal_token_baseline_torch,
         (r, mask, index2, k2, 3, old, sq, None, True, "keep")),
    ]


@pytest.mark.parametrize("case", _compile_cases(), ids=lambda c: c[0])
def test_estimator_references_compile_without_graph_breaks(case):
    # The references (what the public functions call after their checks, which look at score values
    # and renumber tensor group ids with torch.unique, a dynamic shape) trace whole.
    _, fn, args = case
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    close(got, fn(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["whiten", "discounted_returns", "reinforce_pp", "optimal_token_baseline"])
def test_public_estimators_without_value_checks_compile_whole(name):
    # These look at shapes and options only (the others check score values, or renumber tensor ids).
    gen = torch.Generator().manual_seed(8)
    r = torch.randn(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.7
    old, sq = -torch.rand(4, 6, generator=gen), torch.rand(4, 6, generator=gen)
    fn, args, kw = {
        "whiten": (rlloss.whiten, (r, mask), {}),
        "discounted_returns": (rlloss.discounted_returns, (r, mask), {"gamma": 0.9}),
        "reinforce_pp": (rlloss.reinforce_pp_advantages, (r, mask), {"gamma": 0.99}),
        "optimal_token_baseline": (rlloss.optimal_token_baseline_advantages, (r, mask),
                                   {"old_logp": old, "sum_pi_squared": sq, "group_size": 2}),
    }[name]
    torch._dynamo.reset()
    close(torch.compile(fn, fullgraph=True, backend="aot_eager")(*args, **kw), fn(*args, **kw), rtol=1e-6, atol=1e-6)


def test_estimators_fuse_under_inductor():
    gen = torch.Generator().manual_seed(6)
    n, tlen = 8, 16
    scores = torch.randn(n, generator=gen)
    mask = torch.arange(tlen)[None] < torch.randint(0, tlen + 1, (n, 1), generator=gen)
    r = torch.randn(n, tlen, generator=gen)
    old = -torch.rand(n, tlen, generator=gen)
    sq = torch.rand(n, tlen, generator=gen)
    index, k = group_index(4, n, scores.device)

    def step(scores, r, old, sq, mask):
        return (A._reinforce_pp_baseline_torch(scores, index, k, mask, "zero"),
                R._discounted_returns_torch(r, mask, 0.9),
                A._opo_torch(scores, index, k, mask, "zero"),
                A._passk_torch(scores, index, k, mask, "group", 1e-6),
                R._optimal_token_baseline_torch(r, mask, index, k, 4, old, sq, None, True, "zero"))

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(scores, r, old, sq, mask)
    want = step(scores, r, old, sq, mask)
    for gt, wt in zip(got, want):
        close(gt, wt, rtol=1e-5, atol=1e-5)
