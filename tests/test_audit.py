"""``rlloss.audit.audit_loss``: what a loss optimises, measured, on losses whose answer is known by hand.

Expected values come from the formulas, never from the audit: an exact rlloss loss (global counts)
is its aggregation at scale 1; a loss divided once more by the accumulation steps is at scale
``1/micro_batches``; a row sum over ``sqrt(n_i)`` matches no aggregation but weighs a token
``1/sqrt(n_i)``; GRPO's per-response mean weighs it ``1/n_i``; a per-micro-batch token mean gives
every token of micro-batch ``k`` the weight ``1/(K*n_k)``, so its change between splits is computed
here from the splits' token counts. What could fail: the step's gradient formed wrongly (not summed
over micro-batches, not averaged over ranks), counts in ``window`` that are not the step's, a piece
without tokens, the least-squares scale or the residual, the tie rule, split-invariance hidden by
splits that all look alike, the weights by length, the report's numbers, matplotlib imported early.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import rlloss
from rlloss.audit import Audit, Window, audit_loss
from rlloss.audit.probe import SPLITS, draw_batches, length_ladder, make_splits

NAMES = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "token_sum"]
MAX_TOKENS = 40

OBJECTIVES = {
    "ppo": rlloss.PPO(),
    "ppo-dapo-dual": rlloss.PPO(eps_low=0.2, eps_high=0.28, dual_clip=3.0),
    "ppo-delta": rlloss.PPO(delta=1.5),
    "gspo": rlloss.PPO(eps_low=3e-4, eps_high=4e-4, level="sequence"),
    "cispo": rlloss.CISPO(),
    "sapo": rlloss.SAPO(),
    "reinforce": rlloss.Reinforce(),
    "dppo_tv": rlloss.DPPO(divergence="tv"),
    "dppo_kl": rlloss.DPPO(divergence="kl"),
    "dro": rlloss.DRO(beta=0.1),
    "vespo": rlloss.VESPO(),
    "kl_cov": rlloss.KLCov(ratio=0.05),
    # no token has a covariance in (cov_low, cov_high) on the probe: nothing is cut (see test_clip_cov_cuts_show)
    "clip_cov": rlloss.ClipCov(cov_low=50.0, cov_high=60.0),
}


def flat(report: str) -> str:
    """The report with its folded lines joined: phrases are asserted whole, wherever a line folds."""
    return " ".join(report.split())


def test_report_lines_fit_a_terminal():
    audit = audit_loss(exact("token_mean"), micro_batches=2)
    assert max(map(len, audit.report().splitlines())) <= 79


def exact(aggregation, objective=None, **options):
    """rlloss's loss with the step's counts from the window: exact under any split."""
    def loss_fn(logp, old_logp, adv, mask, window):
        max_tokens = window.max_tokens if aggregation == "constant" else None
        return rlloss.policy_loss(logp, old_logp, adv, mask, objective=objective, aggregation=aggregation,
                                  max_tokens=max_tokens, num_tokens=window.num_tokens, num_seqs=window.num_seqs,
                                  dp_size=window.dp_size, **options).loss
    return loss_fn


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_rlloss_loss_is_recovered(objective, name):
    audit = audit_loss(exact(name, OBJECTIVES[objective]), micro_batches=2,
                       max_tokens=MAX_TOKENS if name == "constant" else None)
    assert audit.aggregation == name
    assert audit.scale == pytest.approx(1.0, abs=1e-6)
    assert audit.residual < 1e-9
    assert audit.split_invariant and audit.split_error < 1e-9
    assert audit.grad_norm > 0


@pytest.mark.parametrize("name", NAMES)
def test_every_aggregation_is_recovered_across_ranks(name):
    audit = audit_loss(exact(name), micro_batches=3, dp_size=2, max_tokens=MAX_TOKENS if name == "constant" else None)
    assert audit.aggregation == name and audit.scale == pytest.approx(1.0, abs=1e-6)
    assert audit.split_invariant and audit.split_error < 1e-9


def test_gmpo_is_its_per_sequence_aggregation():
    audit = audit_loss(exact("seq_mean_token_mean", rlloss.GMPO()), micro_batches=3)
    assert audit.aggregation == "seq_mean_token_mean" and audit.scale == pytest.approx(1.0, abs=1e-6)
    assert audit.split_invariant


def test_kl_at_the_reference_leaves_the_aggregation():
    """beta != 0 with ref_logp = logp: the KL and its gradient are 0 at the probe point."""
    def loss_fn(logp, old_logp, adv, mask, window):
        return rlloss.policy_loss(logp, old_logp, adv, mask, ref_logp=old_logp, beta=0.1,
                                  num_tokens=window.num_tokens).loss
    audit = audit_loss(loss_fn, micro_batches=2)
    assert audit.aggregation == "token_mean" and audit.scale == pytest.approx(1.0, abs=1e-6)


def test_a_single_piece_is_its_local_aggregation():
    """One micro-batch on one rank: the local defaults are the step's counts."""
    def loss_fn(logp, old_logp, adv, mask, window):
        return rlloss.policy_loss(logp, old_logp, adv, mask, aggregation="seq_mean_token_mean").loss
    audit = audit_loss(loss_fn)
    assert audit.aggregation == "seq_mean_token_mean" and audit.scale == pytest.approx(1.0, abs=1e-6)
    assert audit.split_invariant and audit.micro_batches == 1 and audit.dp_size == 1


@pytest.mark.parametrize("micro_batches, dp_size", [(4, 1), (3, 2)])
def test_extra_division_by_accumulation_is_scale_one_over_micro_batches(micro_batches, dp_size):
    """The ms-swift report: a correct token mean divided once more by the accumulation steps."""
    def loss_fn(logp, old_logp, adv, mask, window):
        return exact("token_mean")(logp, old_logp, adv, mask, window) / window.micro_batches
    audit = audit_loss(loss_fn, micro_batches=micro_batches, dp_size=dp_size)
    assert audit.aggregation == "token_mean"
    assert audit.scale == pytest.approx(1 / micro_batches, abs=1e-6)
    assert audit.split_invariant
    assert "1/micro_batches" in flat(audit.report())


def test_missing_dp_size_is_scale_one_over_ranks():
    """Global counts without the dp_size factor: DDP's average over ranks is not undone."""
    def loss_fn(logp, old_logp, adv, mask, window):
        return rlloss.policy_loss(logp, old_logp, adv, mask, num_tokens=window.num_tokens).loss
    audit = audit_loss(loss_fn, micro_batches=2, dp_size=4)
    assert audit.aggregation == "token_mean" and audit.scale == pytest.approx(0.25, abs=1e-6)
    assert "1/dp_size" in flat(audit.report())


def test_sign_flip_is_reported():
    audit = audit_loss(lambda *args: -exact("token_mean")(*args), micro_batches=2)
    assert audit.aggregation == "token_mean" and audit.scale == pytest.approx(-1.0, abs=1e-6)
    assert "sign is flipped" in flat(audit.report())


def sqrt_row_sum(logp, old_logp, adv, mask, window):
    """sum_i (sum_t l_it M_it) / sqrt(n_i) / N_seq: split-invariant, no aggregation of rlloss."""
    per_token = torch.where(mask, -adv[:, None] * torch.exp(logp - old_logp), torch.zeros_like(logp))
    n = mask.sum(-1).clamp(min=1).to(logp.dtype)
    return (per_token.sum(-1) / n.sqrt()).sum() / window.num_seqs


def test_sqrt_length_normaliser_matches_nothing_and_is_split_invariant():
    audit = audit_loss(sqrt_row_sum, micro_batches=3, dp_size=2)
    assert audit.aggregation is None and audit.scale is None
    assert audit.split_invariant
    assert audit.residual > 1e-2  # far from every aggregation, not a near miss
    weights = audit.token_weight_by_length
    # weight of a token of a row of length n: 1 / (sqrt(n) * N_seq), the same N_seq for every row
    scaled = [w * math.sqrt(n) for n, w in weights.items()]
    assert max(scaled) == pytest.approx(min(scaled), rel=1e-9)
    assert set(weights) == set(length_ladder(48))
    assert "^-0.50" in flat(audit.report()) and "no aggregation matches" in flat(audit.report())


def test_grpo_per_response_mean_weighs_a_token_one_over_its_length():
    audit = audit_loss(exact("seq_mean_token_mean"), micro_batches=2)
    weights = audit.token_weight_by_length
    assert len(weights) >= 8 and max(weights) >= 40
    for n, w in weights.items():
        assert w == pytest.approx(weights[1] / n, rel=1e-9)
    # and a token mean weighs every token the same
    flat = audit_loss(exact("token_mean"), micro_batches=2).token_weight_by_length
    assert max(flat.values()) == pytest.approx(min(flat.values()), rel=1e-9)
    assert audit.token_weight_by_length_negative == pytest.approx(weights, rel=1e-9)


def per_micro_batch_token_mean(logp, old_logp, adv, mask, window):
    """The classic accumulation bug: each micro-batch its own token mean, then divided by the steps."""
    return rlloss.policy_loss(logp, old_logp, adv, mask, aggregation="token_mean").loss / window.micro_batches


def expected_split_error(micro_batches, dp_size, seed=0):
    """max over batches and splits of |w_s - w_0| / |w_0|, w = -A/(K*n_k) per token (by hand)."""
    batches = draw_batches(micro_batches * dp_size, longest=48, width=None, seed=seed)
    worst = 0.0
    for k, batch in enumerate(batches):
        grads = []
        for split in make_splits(batch, micro_batches, dp_size, equal_rows=False, seed=seed + 1 + k):
            g = torch.zeros_like(batch.logp)
            for piece in split.pieces:
                n_k = int(batch.mask[piece.rows].sum())
                weight = 1.0 / (micro_batches * n_k * dp_size)
                g[piece.rows] = -batch.adv[piece.rows, None] * batch.mask[piece.rows] * weight
            grads.append(g)
        worst = max(worst, max(float((g - grads[0]).norm() / grads[0].norm()) for g in grads[1:]))
    return worst


@pytest.mark.parametrize("micro_batches, dp_size", [(2, 1), (4, 1), (2, 2)])
def test_per_micro_batch_token_mean_is_not_split_invariant(micro_batches, dp_size):
    audit = audit_loss(per_micro_batch_token_mean, micro_batches=micro_batches, dp_size=dp_size)
    assert not audit.split_invariant
    want = expected_split_error(micro_batches, dp_size)
    assert want > 0.5  # the lopsided split makes the error large: a weak probe would hide it
    assert audit.split_error == pytest.approx(want, rel=1e-9)
    assert audit.aggregation is None and audit.residual > 0.1
    assert f"{audit.split_error:.4g}" in flat(audit.report())


def test_per_micro_batch_token_mean_on_one_micro_batch_is_exact():
    """The same code is right when the step is one micro-batch: the bug needs accumulation to show."""
    audit = audit_loss(per_micro_batch_token_mean)
    assert audit.aggregation == "token_mean" and audit.split_invariant


@pytest.mark.parametrize("name, want", [("constant", "constant"), ("seq_mean_token_sum", "seq_mean_token_sum")])
def test_ties_go_to_the_scale_closest_to_one(name, want):
    """constant is seq_mean_token_sum / max_tokens: both fit exactly, the scale decides."""
    audit = audit_loss(exact(name), micro_batches=2, max_tokens=MAX_TOKENS)
    tied = [n for n in ("constant", "seq_mean_token_sum") if audit.candidates[n][1] < 1e-9]
    assert len(tied) == 2
    assert audit.aggregation == want and audit.scale == pytest.approx(1.0, abs=1e-6)
    other = {"constant", "seq_mean_token_sum"} - {want}
    ratio = 1 / MAX_TOKENS if want == "constant" else MAX_TOKENS
    assert audit.candidates[other.pop()][0] == pytest.approx(ratio, rel=1e-9)


def test_constant_is_a_candidate_only_with_max_tokens():
    assert "constant" not in audit_loss(exact("token_mean")).candidates
    assert set(audit_loss(exact("token_mean"), max_tokens=MAX_TOKENS).candidates) == set(NAMES)


def test_loss_zero_is_not_gradient_zero():
    """On the lengths batch (+A and -A twins) the loss is 0; the gradient's norm is sqrt(sum_i A_i^2 n_i) / N_tok."""
    audit = audit_loss(exact("token_mean"), micro_batches=2)
    batch = draw_batches(2, longest=48, width=None, seed=0)[0]
    n = batch.mask.sum(-1).to(batch.adv.dtype)
    want = float((batch.adv ** 2 * n).sum().sqrt() / n.sum())
    assert abs(audit.loss_value) < 1e-12
    assert audit.grad_norm == pytest.approx(want, rel=1e-9)


def test_window_holds_the_steps_counts_as_ints():
    calls = []

    def loss_fn(logp, old_logp, adv, mask, window):
        calls.append((window, int(mask.sum()), mask.shape[0], torch.equal(old_logp, logp.detach()),
                      old_logp.requires_grad, logp.requires_grad))
        return exact("token_mean")(logp, old_logp, adv, mask, window)

    audit_loss(loss_fn, micro_batches=3, dp_size=2, max_tokens=MAX_TOKENS)
    per_step = 3 * 2
    assert len(calls) % per_step == 0 and len(calls) == 3 * len(SPLITS) * per_step
    for start in range(0, len(calls), per_step):
        step = calls[start:start + per_step]
        window = step[0][0]
        assert all(isinstance(window[key], int) for key in ("num_tokens", "num_seqs", "micro_batches", "dp_size"))
        assert window.num_tokens == sum(tokens for _, tokens, *_ in step)  # every token of the step, all ranks
        assert window.num_seqs == sum(rows for _, _, rows, *_ in step)  # every row, empty ones too
        assert {(w.micro_batch, w.rank) for w, *_ in step} == {(m, r) for m in range(3) for r in range(2)}
        assert all(w.max_tokens == MAX_TOKENS and w.micro_batches == 3 and w.dp_size == 2 for w, *_ in step)
        assert all(tokens > 0 for _, tokens, *_ in step)  # no piece is empty
        assert all(same and not old_grad and grad for *_, same, old_grad, grad in step)  # on-policy
    assert window["num_tokens"] == window.num_tokens
    with pytest.raises(KeyError, match="num_seqs"):
        window["tokens"]


def test_probe_batches_tell_the_aggregations_apart():
    """Token counts, row counts and their ratio differ between batches; one row is empty; lengths span the ladder."""
    batches = draw_batches(4, longest=48, width=None, seed=0)
    tokens = [int(b.mask.sum()) for b in batches]
    rows = [b.mask.shape[0] for b in batches]
    assert len(set(tokens)) == 3 and len(set(rows)) == 3
    assert len({round(t / r, 6) for t, r in zip(tokens, rows)}) == 3
    assert any((b.lengths == 0).any() for b in batches)
    assert set(batches[0].lengths.tolist()) >= set(length_ladder(48))
    assert all(r % 4 == 0 and r >= 8 for r in rows)
    padded = draw_batches(4, longest=MAX_TOKENS, width=MAX_TOKENS, seed=0)
    assert all(b.mask.shape[1] == MAX_TOKENS for b in padded)
    twins = batches[0]
    half = twins.mask.shape[0] // 2
    assert torch.equal(twins.adv[:half], -twins.adv[half:]) and torch.equal(twins.logp[:half], twins.logp[half:])


@pytest.mark.parametrize("equal_rows", [False, True])
def test_splits_cover_every_row_once_with_very_different_pieces(equal_rows):
    batch = draw_batches(6, longest=48, width=None, seed=0)[2]
    splits = make_splits(batch, 3, 2, equal_rows=equal_rows, seed=1)
    assert [s.name for s in splits] == list(SPLITS)
    spreads = {}
    for split in splits:
        rows = torch.cat([p.rows for p in split.pieces])
        assert sorted(rows.tolist()) == list(range(batch.mask.shape[0]))
        assert {(p.micro_batch, p.rank) for p in split.pieces} == {(m, r) for m in range(3) for r in range(2)}
        tokens = [int(batch.mask[p.rows].sum()) for p in split.pieces]
        assert min(tokens) > 0
        if equal_rows:
            assert len({len(p.rows) for p in split.pieces}) == 1
        spreads[split.name] = max(tokens) / min(tokens)
    assert spreads["lopsided"] > 3 and spreads["token-balanced"] < spreads["lopsided"]
    if not equal_rows:
        assert len({len(p.rows) for p in splits[SPLITS.index("random")].pieces}) > 1


def test_equal_rows_hides_a_per_row_count_normaliser():
    """``B_local * micro_batches`` rows is TRL's grpo normaliser: right only when micro-batches hold equal rows."""
    def loss_fn(logp, old_logp, adv, mask, window):
        return rlloss.policy_loss(logp, old_logp, adv, mask, aggregation="seq_mean_token_mean",
                                  num_seqs=mask.shape[0] * window.micro_batches).loss
    assert audit_loss(loss_fn, micro_batches=2, equal_rows=True).split_invariant
    assert not audit_loss(loss_fn, micro_batches=2).split_invariant


def test_a_zero_gradient_is_no_objective():
    audit = audit_loss(lambda logp, *rest: (logp * 0).sum(), micro_batches=2)
    assert audit.aggregation is None and audit.nearest is None and audit.grad_norm == 0
    assert "no gradient" in flat(audit.report())


def test_clip_cov_cuts_show():
    """A data-dependent filter: Clip-Cov zeroes a token per call, chosen by covariance, so the step's
    gradient loses a few tokens and depends on the split (each call picks its own)."""
    audit = audit_loss(exact("token_mean", rlloss.ClipCov(ratio=0.02)), micro_batches=2)
    assert audit.nearest == "token_mean" and not audit.split_invariant
    assert 1e-3 < audit.residual < 0.5


def test_report_names_the_objective_and_the_call():
    report = flat(audit_loss(exact("constant"), micro_batches=2, max_tokens=MAX_TOKENS).report())
    assert f"sum_i sum_t l_it*M_it / (N_seq * {MAX_TOKENS})" in report
    assert f'aggregation="constant", max_tokens={MAX_TOKENS}' in report
    assert "departures: none" in report and "split-invariant: yes" in report


def test_plot_writes_a_png(tmp_path):
    audit = audit_loss(sqrt_row_sum, micro_batches=2)
    path = audit.plot(tmp_path / "sub" / "audit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_matplotlib_and_trainers_are_imported_only_when_used(tmp_path):
    code = (
        "import sys, rlloss\n"
        "assert 'rlloss.audit' not in sys.modules\n"
        "import rlloss.audit\n"
        "bad = [m for m in ('matplotlib', 'trl', 'verl', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "a = rlloss.audit.audit_loss(lambda l, o, a, m, w: rlloss.policy_loss(l, o, a, m).loss)\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"a.plot({str(tmp_path / 'a.png')!r})\n"
        "assert 'matplotlib' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(micro_batches=0), ValueError, "micro_batches must be >= 1, got 0"),
    (dict(micro_batches=2.0), TypeError, "micro_batches must be an int"),
    (dict(dp_size=True), TypeError, "dp_size must be an int"),
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1"),
    (dict(max_tokens="64"), TypeError, "max_tokens must be an int >= 1 or None"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(equal_rows=1), TypeError, "equal_rows must be a bool"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        audit_loss(exact("token_mean"), **kwargs)


def test_bad_loss_functions_are_named():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        audit_loss("token_mean")
    with pytest.raises(TypeError, match=r"0-d floating tensor.*shape \(\d+,\)"):
        audit_loss(lambda logp, *rest: logp.sum(-1))
    with pytest.raises(TypeError, match="got float"):
        audit_loss(lambda *rest: 0.0)
    with pytest.raises(ValueError, match="does not depend on logp"):
        audit_loss(lambda logp, old_logp, *rest: old_logp.sum())


def test_audit_is_a_frozen_record():
    audit = audit_loss(exact("token_mean"))
    assert isinstance(audit, Audit) and isinstance(Window, type)
    with pytest.raises(AttributeError):
        audit.scale = 2.0
    assert all(isinstance(n, int) and isinstance(w, float) for n, w in audit.token_weight_by_length.items())
