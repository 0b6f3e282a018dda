"""Off-policy corrections and masks (``rlloss.corrections``): importance weights, rejection, the
off-policy sequence mask and the top-entropy mask, with its global variant on 2 gloo processes.

Hand-worked values (each expected number written out from the formula, never computed by the code
under test), the edge cases that decide numbers (weights exactly at the bounds, empty rows,
all-masked inputs, the quantile's interpolation), properties over random inputs, bad input, and
``torch.compile(fullgraph=True)`` of every reference (no graph break).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlloss
from strategies import MASK_KINDS, make_mask
from helpers import DEVICE, gloo_rank, spawn_ranks
from rlloss import corrections as C
from rlloss.distributed import top_entropy_mask as global_top_entropy_mask

LN2 = math.log(2.0)
NAN = math.nan


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=DEVICE)


def b(x):
    return torch.tensor(x, dtype=torch.bool, device=DEVICE)


# =============================================================================================
# importance_weights
# =============================================================================================

# One row: old - sampling = [ln 2, 0, -0.5] on valid tokens; the 4th position is masked and holds NaN.
OLD = [[0.0, -1.0, -2.0, NAN]]
SAMPLING = [[-LN2, -1.0, -1.5, 0.0]]
MASK = [[True, True, True, False]]
E_HALF = math.exp(-0.5)  # 0.6065...


@pytest.mark.parametrize(
    "mode, low, high, expected",
    [
        ("truncate", None, None, [2.0, 1.0, E_HALF, 0.0]),
        ("truncate", None, 1.5, [1.5, 1.0, E_HALF, 0.0]),  # TIS: capped from above
        ("truncate", 0.7, 1.5, [1.5, 1.0, 0.7, 0.0]),  # both sides
        ("truncate", None, 2.0, [2.0, 1.0, E_HALF, 0.0]),  # exactly at the cap: unchanged
        ("mask", None, 1.5, [0.0, 1.0, E_HALF, 0.0]),  # TRL token_mask: > cap -> 0
        ("mask", 0.7, None, [2.0, 1.0, 0.0, 0.0]),
        ("mask", 0.5, 2.0, [2.0, 1.0, E_HALF, 0.0]),  # IcePop: 2.0 == high is kept (inclusive)
        ("mask", 1.0, 1.0, [0.0, 1.0, 0.0, 0.0]),  # w == 1 at both bounds: kept
    ],
)
def test_importance_weights_token_level(mode, low, high, expected):
    dtype = torch.float64  # exp(ln 2) == 2 exactly here, so the bound comparisons are exact
    got = rlloss.importance_weights(t(OLD, dtype), t(SAMPLING, dtype), b(MASK), mode=mode, low=low, high=high)
    torch.testing.assert_close(got, t([expected], dtype), rtol=1e-15, atol=0)


def test_importance_weights_at_the_bounds_in_fp32():
    # fp32: old - sampling = fp32(ln 2) and exp of it is 2.0 exactly; weights equal to a bound stay.
    old, samp = t([[0.0, 0.0]]), t([[-LN2, 0.0]])
    got = rlloss.importance_weights(old, samp, b([[True, True]]), mode="mask", low=1.0, high=2.0)
    torch.testing.assert_close(got, t([[2.0, 1.0]]), rtol=0, atol=0)
    got = rlloss.importance_weights(old, samp, b([[True, True]]), mode="truncate", low=1.0, high=2.0)
    torch.testing.assert_close(got, t([[2.0, 1.0]]), rtol=0, atol=0)


def test_importance_weights_sequence_level():
    # Row sum: ln 2 + 0 - 0.5, so the row weight is 2 e^-0.5 = 1.2131 on every valid token.
    old, samp, mask = t(OLD, torch.float64), t(SAMPLING, torch.float64), b(MASK)
    w = 2 * E_HALF
    got = rlloss.importance_weights(old, samp, mask, level="sequence")
    torch.testing.assert_close(got, t([[w, w, w, 0.0]], torch.float64))
    got = rlloss.importance_weights(old, samp, mask, level="sequence", high=1.0)  # TIS
    torch.testing.assert_close(got, t([[1.0, 1.0, 1.0, 0.0]], torch.float64))
    got = rlloss.importance_weights(old, samp, mask, level="sequence", mode="mask", high=1.0)  # MIS
    torch.testing.assert_close(got, t([[0.0, 0.0, 0.0, 0.0]], torch.float64))
    got = rlloss.importance_weights(old, samp, mask, level="sequence", mode="mask", low=0.5, high=1.25)
    torch.testing.assert_close(got, t([[w, w, w, 0.0]], torch.float64))


def test_importance_weights_clamp_the_log_ratio_at_20():
    # token: x = 30 -> e^20; x = -30 -> e^-20. sequence: the row sum 30 - 5 = 25 is clamped to 20.
    old, samp = t([[30.0, -5.0], [-30.0, 0.0]], torch.float64), t([[0.0, 0.0], [0.0, 0.0]], torch.float64)
    mask = b([[True, True], [True, True]])
    got = rlloss.importance_weights(old, samp, mask)
    torch.testing.assert_close(got, t([[math.exp(20), math.exp(-5)], [math.exp(-20), 1.0]], torch.float64))
    got = rlloss.importance_weights(old, samp, mask, level="sequence")
    torch.testing.assert_close(got, t([[math.exp(20)] * 2, [math.exp(-20)] * 2], torch.float64))


def test_importance_weights_nan_difference_counts_as_zero():
    # A valid token without a sampling log-prob (NaN, TRL): ratio 1, and 0 in the row's sum.
    old, samp = t([[0.0, 0.0]], torch.float64), t([[NAN, -LN2]], torch.float64)
    mask = b([[True, True]])
    torch.testing.assert_close(rlloss.importance_weights(old, samp, mask), t([[1.0, 2.0]], torch.float64))
    torch.testing.assert_close(rlloss.importance_weights(old, samp, mask, level="sequence"),
                               t([[2.0, 2.0]], torch.float64))


def test_importance_weights_normalize_token_and_sequence():
    old = t([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], torch.float64)
    samp = t([[-LN2, 0.0], [LN2, NAN], [5.0, 5.0]], torch.float64)
    mask = b([[True, True], [True, False], [False, False]])  # the last row is empty
    # token: weights 2, 1, 0.5 on the valid tokens, mean 3.5/3.
    got = rlloss.importance_weights(old, samp, mask, normalize=True)
    s = 3 / 3.5
    torch.testing.assert_close(got, t([[2 * s, 1 * s], [0.5 * s, 0.0], [0.0, 0.0]], torch.float64))
    # sequence: row weights 2 and 0.5; the empty row is not counted: mean 1.25.
    got = rlloss.importance_weights(old, samp, mask, level="sequence", normalize=True)
    torch.testing.assert_close(got, t([[1.6, 1.6], [0.4, 0.0], [0.0, 0.0]], torch.float64))


def test_importance_weights_normalize_is_skipped_when_the_mean_is_tiny():
    old, samp = t([[0.0, 0.0]]), t([[-LN2, -LN2]])  # weights 2, 2, all masked out by high=1
    got = rlloss.importance_weights(old, samp, b([[True, True]]), mode="mask", high=1.0, normalize=True)
    torch.testing.assert_close(got, t([[0.0, 0.0]]), rtol=0, atol=0)
    # mean e^-20 ~ 2e-9 <= 1e-8: left as it is (verl)
    got = rlloss.importance_weights(t([[-20.0]]), t([[0.0]]), b([[True]]), normalize=True)
    torch.testing.assert_close(got, t([[math.exp(-20)]]))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("normalize", [False, True])
def test_importance_weights_all_masked_is_zero(level, normalize):
    old = t([[NAN, 1.0], [2.0, NAN]])
    got = rlloss.importance_weights(old, old * 0, b([[False, False], [False, False]]), level=level,
                                    normalize=normalize, high=2.0)
    torch.testing.assert_close(got, t([[0.0, 0.0], [0.0, 0.0]]), rtol=0, atol=0)


def test_importance_weights_are_detached_fp32():
    old = t([[-1.0, -2.0]], torch.bfloat16).requires_grad_(True)
    samp = t([[-1.5, -2.0]], torch.bfloat16)
    got = rlloss.importance_weights(old, samp, b([[True, True]]))
    assert got.dtype == torch.float32 and not got.requires_grad


# =============================================================================================
# rejection_mask
# =============================================================================================

def test_rejection_k1_token_keeps_log_ratio_inside_the_bounds_inclusive():
    # x = logp - rollout = [ln2, 0, -ln2, -ln4]; k1 = -x = [-ln2, 0, ln2, ln4].
    # high=2 (low=1/2): keep -ln2 <= k1 <= ln2, both bounds included.
    logp = t([[0.0, 0.0, 0.0, 0.0, NAN]])
    roll = t([[-LN2, 0.0, LN2, 2 * LN2, 0.0]])
    mask = b([[True, True, True, True, False]])
    got = rlloss.rejection_mask(logp, roll, mask, high=2.0)
    assert got.tolist() == [[True, True, True, False, False]]
    got = rlloss.rejection_mask(logp, roll, mask, low=1.0, high=4.0)  # keep 0 <= k1 <= ln4
    assert got.tolist() == [[False, True, True, True, False]]


def test_rejection_k2_and_k3_token():
    # x = [1, -1, 1.5, 0]: k2 = x^2/2 = [0.5, 0.5, 1.125, 0]; k3 = e^x - 1 - x = [e-2, 1/e, e^1.5-2.5, 0]
    logp, roll = t([[1.0, -1.0, 1.5, 0.0]]), t([[0.0, 0.0, 0.0, 0.0]])
    mask = b([[True, True, True, True]])
    assert rlloss.rejection_mask(logp, roll, mask, kind="k2", high=0.5).tolist() == [[True, True, False, True]]
    # e - 2 = 0.718 > 0.5, 1/e = 0.368 <= 0.5, e^1.5 - 2.5 = 1.98 > 0.5
    assert rlloss.rejection_mask(logp, roll, mask, kind="k3", high=0.5).tolist() == [[False, True, False, True]]


def test_rejection_sequence_levels():
    # Row 0: x = [ln2, ln2]; row 1: x = [0, -ln2] and a masked NaN; row 2 empty.
    logp = t([[LN2, LN2, 0.0], [0.0, -LN2, NAN], [NAN, NAN, NAN]], torch.float64)
    roll = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], torch.float64)
    mask = b([[True, True, False], [True, True, False], [False, False, False]])
    # seq_sum k1: row 0 sums to -2 ln2 = ln(1/4): kept with high=4 (low 1/4, at the bound), not with high=3.
    assert rlloss.rejection_mask(logp, roll, mask, level="seq_sum", high=4.0).tolist() == [
        [True, True, False], [True, True, False], [False, False, False]]
    assert rlloss.rejection_mask(logp, roll, mask, level="seq_sum", high=3.0).tolist() == [
        [False, False, False], [True, True, False], [False, False, False]]
    # seq_mean k1: row 0 mean -ln2 (kept at high=2, at the bound), row 1 mean ln2/2.
    assert rlloss.rejection_mask(logp, roll, mask, level="seq_mean", high=2.0).tolist() == [
        [True, True, False], [True, True, False], [False, False, False]]
    assert rlloss.rejection_mask(logp, roll, mask, level="seq_mean", low=0.9, high=1.5).tolist() == [
        [False, False, False], [True, True, False], [False, False, False]]
    # seq_max k2: row 0 max ln2^2/2 = 0.2402, row 1 the same: high 0.24 drops both, 0.25 keeps both.
    assert not rlloss.rejection_mask(logp, roll, mask, kind="k2", level="seq_max", high=0.24).any()
    assert rlloss.rejection_mask(logp, roll, mask, kind="k2", level="seq_max", high=0.25).tolist() == [
        [True, True, False], [True, True, False], [False, False, False]]
    # seq_mean k3: row 0: e^ln2 - 1 - ln2 = 0.3069 per token; row 1: (0 + (0.5 - 1 + ln2))/2 = 0.0966
    assert rlloss.rejection_mask(logp, roll, mask, kind="k3", level="seq_mean", high=0.1).tolist() == [
        [False, False, False], [True, True, False], [False, False, False]]


def _rejection_loop(logp, roll, mask, kind, level, low, high):
    """SPEC's rejection_mask written as a float64 loop over rows and tokens (Python floats)."""
    keep = []
    for lp_row, r_row, m_row in zip(logp.tolist(), roll.tolist(), mask.tolist()):
        stats = []
        for lp, r, m in zip(lp_row, r_row, m_row):
            x = min(max(lp - r, -20.0), 20.0) if m else 0.0
            stats.append({"k1": -x, "k2": x * x / 2, "k3": math.exp(x) - 1 - x}[kind])
        valid = [s for s, m in zip(stats, m_row) if m]
        if level == "token":
            row_stat = stats
        else:
            value = {"seq_sum": sum(valid), "seq_mean": sum(valid) / max(len(valid), 1),
                     "seq_max": max(valid, default=-math.inf)}[level]
            row_stat = [value] * len(stats)
        if kind == "k1":
            lo = 1 / high if low is None else low
            ok = [math.log(lo) <= s <= math.log(high) for s in row_stat]
        else:
            ok = [s <= high for s in row_stat]
        keep.append([o and m for o, m in zip(ok, m_row)])
    return keep


@pytest.mark.parametrize("kind, level", [("k1", "seq_mean"), ("k2", "seq_mean"), ("k3", "seq_mean"),
                                         ("k1", "seq_sum"), ("k3", "seq_sum"), ("k2", "seq_max"), ("k3", "seq_max"),
                                         ("k1", "token"), ("k3", "token")])
def test_rejection_row_levels_match_a_float64_loop_at_every_threshold(kind, level):
    """Rows with 1 to 7 of 8 tokens valid (and an empty one), the threshold placed between every two
    neighbouring row statistics of SPEC's formula: each verdict, row by row, is the loop's. A statistic
    over the wrong tokens or by the wrong count (``T``, the batch's count) moves a row across a threshold."""
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([1, 3, 8, 5, 0, 2, 7, 4])
    mask = torch.arange(8)[None] < lengths[:, None]
    mask[3] = mask[3].flip(0)  # a row valid at its end
    roll = -torch.rand(8, 8, generator=gen, dtype=torch.float64) * 3
    logp = roll + 0.6 * torch.randn(8, 8, generator=gen, dtype=torch.float64) - 0.1
    logp[~mask] = NAN  # masked positions never read
    rows = [r for r in range(8) if lengths[r] > 0]
    if level == "token":
        x = (logp - roll)[mask]
        values = {"k1": -x, "k2": x * x / 2, "k3": torch.exp(x) - 1 - x}[kind]
    else:
        values = torch.tensor([_row_stat(logp[r], roll[r], mask[r], kind, level) for r in rows])
    ordered = sorted(set(values.tolist()))
    cuts = [(a + c) / 2 for a, c in zip(ordered, ordered[1:])]
    checked = 0
    for cut in cuts:
        bounds = [(None, math.exp(cut)), (math.exp(cut), math.exp(max(ordered) + 1))] if kind == "k1" \
            else [(None, cut)]
        for low, high in bounds:
            if kind == "k1" and low is None and -cut > cut:
                continue  # high = e^cut < 1: no k1 bounds there (log(1/high) > log(high))
            got = rlloss.rejection_mask(logp.to(DEVICE), roll.to(DEVICE), mask.to(DEVICE), kind=kind, level=level,
                                        low=low, high=high)
            assert got.tolist() == _rejection_loop(logp, roll, mask, kind, level, low, high), (cut, low, high)
            checked += 1
    assert checked >= 4


def _row_stat(logp_row, roll_row, mask_row, kind, level):
    x = [lp - r for lp, r, m in zip(logp_row.tolist(), roll_row.tolist(), mask_row.tolist()) if m]
    stats = [{"k1": -v, "k2": v * v / 2, "k3": math.exp(v) - 1 - v}[kind] for v in x]
    return {"seq_sum": sum(stats), "seq_mean": sum(stats) / len(stats), "seq_max": max(stats)}[level]


def test_rejection_seq_mean_divides_by_the_row_s_own_count():
    """Row 0: 2 of 4 tokens valid, x = 0.4 each: k2 mean 0.08 (kept at high 0.1; a mean over T = 4 would be
    0.04, kept at 0.05 where 0.08 is not); row 1: all 4 valid, x = 0.5: k2 mean 0.125, dropped at both."""
    logp = t([[0.4, 0.4, NAN, NAN], [0.5, 0.5, 0.5, 0.5]], torch.float64)
    roll = torch.zeros(2, 4, dtype=torch.float64, device=DEVICE)
    mask = b([[True, True, False, False], [True, True, True, True]])
    assert rlloss.rejection_mask(logp, roll, mask, kind="k2", level="seq_mean", high=0.1).tolist() == [
        [True, True, False, False], [False, False, False, False]]
    assert not rlloss.rejection_mask(logp, roll, mask, kind="k2", level="seq_mean", high=0.05).any()
    # k1: row 0 mean -0.4: kept with high e^0.45 (bounds +-0.45), dropped with e^0.3 (a mean over T: -0.2, kept)
    assert rlloss.rejection_mask(logp, roll, mask, level="seq_mean", high=math.exp(0.45))[0].tolist() == [
        True, True, False, False]
    assert not rlloss.rejection_mask(logp, roll, mask, level="seq_mean", high=math.exp(0.3))[0].any()


def test_rejection_several_rules_and_their_masks():
    logp, roll = t([[1.0, 0.0], [0.1, 0.1]]), t([[0.0, 0.0], [0.0, 0.0]])
    mask = b([[True, True], [True, True]])
    token = rlloss.rejection_mask(logp, roll, mask, kind="k2", high=0.4)  # drops the token with x = 1
    seq = rlloss.rejection_mask(logp, roll, mask, kind="k3", level="seq_max", high=0.5)  # e-2 > 0.5: row 0
    assert (token & seq).tolist() == [[False, False], [True, True]]


def test_rejection_all_masked_and_nan():
    logp = t([[NAN, 0.0], [NAN, 0.0]])
    roll = t([[0.0, 0.0], [0.0, 0.0]])
    assert not rlloss.rejection_mask(logp, roll, b([[False, False], [False, False]]), high=2.0).any()
    # A NaN at a valid token rejects it (token level) or its whole row (row levels).
    mask = b([[True, True], [True, True]])
    assert rlloss.rejection_mask(logp, roll, mask, high=2.0).tolist() == [[False, True], [False, True]]
    assert not rlloss.rejection_mask(logp, roll, mask, level="seq_mean", high=2.0).any()


# =============================================================================================
# off_policy_mask
# =============================================================================================

def test_off_policy_mask_by_hand():
    # per-token sampling - logp; masked positions hold NaN. threshold 0.5.
    logp = t([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, NAN], [NAN, NAN]])
    samp = t([[9.0, 9.0], [1.0, 0.0], [1.0, 1.0], [NAN, 1.0], [1.0, NAN], [NAN, NAN]])
    mask = b([[True, True], [True, True], [True, True], [True, True], [True, False], [False, False]])
    adv = t([1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    got = rlloss.off_policy_mask(logp, samp, adv, mask, threshold=0.5)
    # row 0: A >= 0 keeps it whatever the drift; row 1: mean 0.5 <= 0.5 (kept at the bound);
    # row 2: mean 1 > 0.5 dropped; row 3: the NaN term counts 0: (0 + 1)/2 = 0.5 kept;
    # row 4: 1/1 = 1 dropped; row 5: empty row, mean 0 kept.
    assert got.tolist() == [True, True, False, True, False, True]
    assert got.dtype == torch.bool and got.shape == (6,)
    # A = 0 counts as non-negative; a negative threshold drops the empty row's 0.
    assert rlloss.off_policy_mask(logp, samp, adv * 0, mask, threshold=-1.0).all()
    assert rlloss.off_policy_mask(logp, samp, adv, mask, threshold=-0.1).tolist() == [
        True, False, False, False, False, False]


# =============================================================================================
# top_entropy_mask
# =============================================================================================

def test_masked_quantile_interpolates_linearly_by_hand():
    # valid [1, 3, 4] (sorted), n = 3: q = 0.25 -> rank 0.5 -> 1 + 0.5 (3 - 1) = 2;
    # q = 0.75 -> rank 1.5 -> 3.5; q = 1 -> 4; q = 0 -> 1. The masked 100 never counts.
    values, valid = t([3.0, 100.0, 1.0, 4.0]), b([True, False, True, True])
    for q, want in [(0.25, 2.0), (0.75, 3.5), (1.0, 4.0), (0.0, 1.0), (0.6, 3.2)]:
        got = C._masked_quantile(values, valid, q)
        torch.testing.assert_close(got, t(want), msg=f"q={q}")


def test_top_entropy_mask_by_hand():
    # valid entropies [0, 2, 4, 8, 10]; fraction 0.4 -> q = 0.6 -> rank 2.4 -> 4 + 0.4*4 = 5.6: keep 8, 10.
    ent = t([[0.0, 2.0, 50.0, 4.0], [8.0, NAN, 10.0, 1.0]])
    mask = b([[True, True, False, True], [True, False, True, False]])
    assert rlloss.top_entropy_mask(ent, mask, fraction=0.4).tolist() == [[False, False, False, False],
                                                                        [True, False, True, False]]
    # fraction 0.5 -> q 0.5 -> rank 2 -> exactly 4: the token at the threshold is kept.
    assert rlloss.top_entropy_mask(ent, mask, fraction=0.5).tolist() == [[False, False, False, True],
                                                                        [True, False, True, False]]
    # fraction 1 keeps every valid token (the threshold is the minimum), none of the masked ones.
    assert rlloss.top_entropy_mask(ent, mask, fraction=1.0).tolist() == mask.tolist()


def test_top_entropy_mask_ties_and_empty():
    ent, mask = t([[1.0, 1.0, 1.0, 1.0]]), b([[True, True, True, True]])
    assert rlloss.top_entropy_mask(ent, mask, fraction=0.25).all()  # all tied at the threshold: all kept
    none = b([[False, False, False, False]])
    assert not rlloss.top_entropy_mask(ent, none, fraction=0.5).any()  # no valid token: all False
    ent_nan = t([[1.0, NAN, 3.0, 2.0]])
    assert not rlloss.top_entropy_mask(ent_nan, mask, fraction=0.5).any()  # NaN quantile, as torch.quantile


def test_top_entropy_mask_compares_bf16_entropies_at_their_exact_value():
    # bf16 entropies 1 and 1.0078125 (the next bf16): the q = 0.5 quantile is 1.00390625 (fp32),
    # which lies between them: only the larger is kept. Rounding the threshold to bf16 would give 1.0.
    ent, mask = t([[1.0, 1.0078125]], torch.bfloat16), b([[True, True]])
    assert rlloss.top_entropy_mask(ent, mask, fraction=0.5).tolist() == [[False, True]]


# =============================================================================================
# Properties
# =============================================================================================

@st.composite
def logp_pairs(draw):
    bsz, tlen = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(bsz, tlen, generator=gen) * 5
    spread = draw(st.sampled_from([0.0, 0.01, 0.5, 3.0, 40.0]))
    samp = old + torch.randn(bsz, tlen, generator=gen) * spread
    same = torch.rand(bsz, tlen, generator=gen) < 0.3
    samp = torch.where(same, old, samp)  # some tokens where both engines agree exactly
    kind = draw(st.sampled_from(MASK_KINDS))
    mask = make_mask(kind, bsz, tlen, gen)
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    return old.to(DEVICE, dtype), samp.to(DEVICE, dtype), mask.to(DEVICE), same.to(DEVICE)


def _nan_fill(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, NAN))


@given(data=logp_pairs(), level=st.sampled_from(["token", "sequence"]), mode=st.sampled_from(["truncate", "mask"]),
       bounds=st.sampled_from([(None, None), (None, 2.0), (0.5, 2.0), (0.9, 1.1), (1.0, 1.0)]),
       normalize=st.booleans())
def test_importance_weights_properties(data, level, mode, bounds, normalize):
    old, samp, mask, same = data
    low, high = bounds
    w = rlloss.importance_weights(old, samp, mask, level=level, mode=mode, low=low, high=high, normalize=normalize)
    assert not w.requires_grad and w.shape == old.shape
    assert bool((w[~mask] == 0).all())
    assert not bool(w.isnan().any())
    # masked positions never matter
    w_nan = rlloss.importance_weights(_nan_fill(old, mask), _nan_fill(samp, mask), mask, level=level, mode=mode,
                                      low=low, high=high, normalize=normalize)
    assert torch.equal(w, w_nan)
    if not normalize:
        if mode == "truncate" and high is not None:
            assert bool((w <= high).all())  # never above the cap
        if mode == "truncate" and low is not None:
            assert bool((w[mask] >= low).all())
        if mode == "mask":
            kept = w[mask]
            kept = kept[kept != 0]
            assert bool((kept >= (low or 0)).all()) and (high is None or bool((kept <= high).all()))
        if level == "token":  # where both engines agree the ratio is exactly 1 (then clamped or kept)
            agree = same & mask
            one = 1.0 if (low is None or low <= 1.0) and (high is None or high >= 1.0) else None
            if one is not None:
                assert bool((w[agree] == 1.0).all())


@given(data=logp_pairs(), kind=st.sampled_from(["k1", "k2", "k3"]),
       level=st.sampled_from(["token", "seq_sum", "seq_mean", "seq_max"]), high=st.sampled_from([1.01, 2.0, 0.5]))
def test_rejection_and_off_policy_mask_properties(data, kind, level, high):
    old, samp, mask, _ = data
    if not (kind == "k1" and level == "seq_max"):
        keep = rlloss.rejection_mask(old, samp, mask, kind=kind, level=level, high=high)
        assert keep.dtype == torch.bool and not bool((keep & ~mask).any())  # a subset of the mask
        assert torch.equal(keep, rlloss.rejection_mask(_nan_fill(old, mask), _nan_fill(samp, mask), mask, kind=kind,
                                                       level=level, high=high))
        if level != "token":  # a row is kept or dropped whole
            rows_kept = keep.any(-1)
            assert torch.equal(keep, mask & rows_kept[:, None])
    adv = torch.linspace(-1, 1, old.shape[0], device=DEVICE).to(old.dtype)
    opm = rlloss.off_policy_mask(old, samp, adv, mask, threshold=0.1)
    assert bool(opm[adv >= 0].all())
    assert torch.equal(opm, rlloss.off_policy_mask(_nan_fill(old, mask), _nan_fill(samp, mask), adv, mask,
                                                   threshold=0.1))


@given(data=logp_pairs(), fraction=st.sampled_from([1e-3, 0.1, 0.2, 1 / 3, 0.5, 0.8, 1.0]))
def test_top_entropy_mask_matches_torch_quantile(data, fraction):
    old, _, mask, _ = data
    ent = -old  # entropies >= 0, some tied (bf16)
    keep = rlloss.top_entropy_mask(ent, mask, fraction=fraction)
    valid = ent[mask].to(torch.float64 if ent.dtype == torch.float64 else torch.float32)
    if valid.numel() == 0:
        assert not keep.any()
        return
    threshold = torch.quantile(valid, 1 - fraction)
    want = mask & (ent.to(threshold.dtype) >= threshold)
    assert torch.equal(keep, want)
    assert torch.equal(keep, rlloss.top_entropy_mask(_nan_fill(ent, mask), mask, fraction=fraction))
    assert int(keep.sum()) >= math.floor(fraction * valid.numel())  # at least the fraction (ties add more)


# =============================================================================================
# Bad input
# =============================================================================================

def _logps():
    return t([[-1.0, -2.0]]), t([[-1.5, -2.0]]), b([[True, True]])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"mode": "clip"}, ValueError, "mode must be one of"),
        ({"level": "seq"}, ValueError, "level must be one of"),
        ({"low": 2.0, "high": 1.0}, ValueError, "low must be <= high"),
        ({"low": -0.1}, ValueError, "low must be >= 0"),
        ({"high": 0.0}, ValueError, "high must be > 0"),
        ({"high": math.inf}, ValueError, "high must be finite"),
        ({"high": "2"}, TypeError, "high must be a number"),
        ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ],
)
def test_importance_weights_bad_options(kwargs, exc, match):
    old, samp, mask = _logps()
    with pytest.raises(exc, match=match):
        rlloss.importance_weights(old, samp, mask, **kwargs)


def test_correction_bad_tensors():
    old, samp, mask = _logps()
    with pytest.raises(ValueError, match="sampling_logp must have the shape of old_logp"):
        rlloss.importance_weights(old, t([[-1.0, -2.0, -3.0]]), mask)
    with pytest.raises(ValueError, match="mask must have the shape of old_logp"):
        rlloss.importance_weights(old, samp, b([[True]]))
    with pytest.raises(TypeError, match="old_logp must be a floating tensor"):
        rlloss.importance_weights(old.long(), samp, mask)
    with pytest.raises(ValueError, match="old_logp must be 2-D"):
        rlloss.importance_weights(old[0], samp[0], mask[0])
    with pytest.raises(ValueError, match="adv must be"):
        rlloss.off_policy_mask(old, samp, t([1.0, 2.0]), mask, threshold=0.1)
    with pytest.raises(ValueError, match="threshold must be finite"):
        rlloss.off_policy_mask(old, samp, t([1.0]), mask, threshold=math.nan)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "k4", "high": 2.0}, "kind must be one of"),
        ({"level": "seq_min", "high": 2.0}, "level must be one of"),
        ({"kind": "k1", "level": "seq_max", "high": 2.0}, 'level="seq_max" needs kind'),
        ({"kind": "k2", "low": 0.1, "high": 2.0}, "low is only for kind='k1'"),
        ({"low": 3.0, "high": 2.0}, "low must be <= high"),
        ({"low": 0.0, "high": 2.0}, "low must be > 0"),
        ({"high": -1.0}, "high must be > 0"),
    ],
)
def test_rejection_mask_bad_options(kwargs, match):
    old, samp, mask = _logps()
    with pytest.raises(ValueError, match=match):
        rlloss.rejection_mask(old, samp, mask, **kwargs)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_top_entropy_mask_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction must be"):
        rlloss.top_entropy_mask(t([[1.0, 2.0]]), b([[True, True]]), fraction=fraction)
    with pytest.raises(ValueError, match="fraction must be"):
        global_top_entropy_mask(t([[1.0, 2.0]]), b([[True, True]]), fraction=fraction)


# =============================================================================================
# torch.compile: every reference traces whole (fullgraph=True makes a graph break an error)
# =============================================================================================

def _compile_cases():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(3, 9, generator=gen) * 4
    samp = old + 0.3 * torch.randn(3, 9, generator=gen)
    mask = torch.rand(3, 9, generator=gen) < 0.7
    mask[2] = False
    adv = torch.tensor([1.0, -1.0, -0.5])
    return [
        ("importance_weights token truncate", rlloss.importance_weights, (old, samp, mask),
         {"high": 1.2, "normalize": True}),
        ("importance_weights sequence mask", rlloss.importance_weights, (old, samp, mask),
         {"level": "sequence", "mode": "mask", "low": 0.5, "high": 2.0, "normalize": True}),
        ("rejection_mask token k1", rlloss.rejection_mask, (old, samp, mask), {"high": 1.3}),
        ("rejection_mask seq_max k3", rlloss.rejection_mask, (old, samp, mask),
         {"kind": "k3", "level": "seq_max", "high": 0.1}),
        ("rejection_mask seq_mean k2", rlloss.rejection_mask, (old, samp, mask),
         {"kind": "k2", "level": "seq_mean", "high": 0.05}),
        ("off_policy_mask", rlloss.off_policy_mask, (old, samp, adv, mask), {"threshold": 0.05}),
        ("top_entropy_mask", rlloss.top_entropy_mask, (-old, mask), {"fraction": 0.3}),
    ]


@pytest.mark.parametrize("case", _compile_cases(), ids=lambda c: c[0])
def test_public_corrections_compile_without_graph_breaks(case):
    # The public functions themselves trace whole: their checks look at shapes and options only.
    _, fn, args, kwargs = case
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args, **kwargs), fn(*args, **kwargs))


def test_corrections_fuse_under_inductor():
    # One inductor compile of a training step's corrections together: no graph break, same values.
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(4, 16, generator=gen) * 4
    samp = old + 0.3 * torch.randn(4, 16, generator=gen)
    mask = torch.rand(4, 16, generator=gen) < 0.8
    adv = torch.tensor([1.0, -1.0, -0.5, 0.2])

    def step(old, samp, adv, mask):
        w = rlloss.importance_weights(old, samp, mask, high=2.0)
        keep = rlloss.rejection_mask(old, samp, mask, kind="k3", level="seq_mean", high=0.2)
        keep = keep & rlloss.off_policy_mask(old, samp, adv, mask, threshold=0.1)[:, None]
        keep = keep & rlloss.top_entropy_mask(-old, mask, fraction=0.5)
        return w, keep

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(old, samp, adv, mask)
    want = step(old, samp, adv, mask)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


# =============================================================================================
# The global top-entropy mask: 2 gloo processes equal one process on the concatenated batch
# =============================================================================================

WORLD = 2
SPAWN_TIMEOUT_S = 120.0
FRACTIONS = (1e-3, 0.2, 0.5, 0.77, 1.0)


def _rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0: 3 rows; rank 1: 5 rows, one empty; a third batch where rank 1 has no valid token."""
    gen = torch.Generator().manual_seed(100 + rank)
    rows = 3 if rank == 0 else 5
    ent = torch.rand(rows, 13, generator=gen) * 3
    ent[:, ::4] = 1.5  # ties across ranks
    mask = torch.rand(rows, 13, generator=gen) < 0.6
    if rank == 1:
        mask[2] = False
    return ent, mask


def _entropy_rank_main(rank: int, port: int, out_dir: str) -> None:
    with gloo_rank(rank, port, out_dir, WORLD):
        ent, mask = _rank_batch(rank)
        res = {f: global_top_entropy_mask(ent, mask, fraction=f) for f in FRACTIONS}
        # a rank with no valid token at all (its mask all False) still takes part
        empty = torch.zeros_like(mask) if rank == 1 else mask
        res["empty"] = global_top_entropy_mask(ent, empty, fraction=0.5)
        res["none"] = global_top_entropy_mask(ent, torch.zeros_like(mask), fraction=0.5)  # no rank has a token
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")


def test_global_top_entropy_mask_on_two_gloo_ranks_equals_one_process(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    results = spawn_ranks(_entropy_rank_main, WORLD, tmp_path, SPAWN_TIMEOUT_S)

    batches = [_rank_batch(r) for r in range(WORLD)]
    ent = torch.cat([x for x, _ in batches])
    mask = torch.cat([m for _, m in batches])
    for f in FRACTIONS:
        want = rlloss.top_entropy_mask(ent, mask, fraction=f)
        got = torch.cat([results[0][f], results[1][f]])
        assert torch.equal(got, want), f"fraction={f}"
        assert got.any()
    # rank 1 with no valid token: the quantile is rank 0's alone, and rank 1 keeps nothing.
    want0 = rlloss.top_entropy_mask(batches[0][0], batches[0][1], fraction=0.5)
    assert torch.equal(results[0]["empty"], want0)
    assert not results[1]["empty"].any()
    assert not results[0]["none"].any() and not results[1]["none"].any()


def test_global_top_entropy_mask_without_a_process_group_is_the_local_one():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    ent, mask = _rank_batch(1)
    assert torch.equal(global_top_entropy_mask(ent, mask, fraction=0.3), rlloss.top_entropy_mask(ent, mask,
                                                                                                 fraction=0.3))
