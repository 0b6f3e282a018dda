"""``audit_trl`` and ``audit_verl`` on the installed TRL 1.16 and verl 0.9.1, every loss type and mode.

Each audit runs the trainer's own code. Its result is compared with a model of that code written
here from the trainer's source (the line is named next to each formula): the gradient the formula
gives every token of every probe step goes through the same summary, and every number must agree
(each candidate's scale and residual, the split error, the token weights). An exact configuration
must come out as its aggregation at scale 1; a departure is asserted at its measured size, and the
documentation's table (docs/audit.md) must show what the trainers measure today. A real TRL train
loop checks the audit's model of ``num_items_in_batch`` and ``old_per_token_logps``. What could
fail: a trainer release that changes a normaliser, the emulation of processes, the generation
batches, verl's counts, the command line, a stale table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import require_trainer
from rlloss.audit import audit_trl  # the audit imports its trainers when it runs
from rlloss.audit.measure import accumulate, audit_steps
from rlloss.audit.table import BEGIN, END, TrlCase, VerlCase, row, trl_cases, verl_cases

# Deselected by default (pyproject: -m "not trainers"); `python -m pytest -m trainers` runs them where TRL and
# verl are installed at their tested versions, and under CI=true a missing trainer fails, never skips.
pytestmark = pytest.mark.trainers
try:
    import trl
    import verl  # noqa: F401

    import rlloss.integrations.trl
except ImportError as exc:  # this module still imports, so that the default run deselects its tests
    TRAINERS_MISSING: ImportError | None = exc
else:
    TRAINERS_MISSING = None


@pytest.fixture(autouse=True)
def _trainers_installed():
    require_trainer(TRAINERS_MISSING)


ROOT = Path(__file__).resolve().parents[1]
TRL_CASES = {case.describe(): case for case in trl_cases()}
VERL_CASES = {case.describe(): case for case in verl_cases()}
DAPO_DOCS = TrlCase("dapo", 4, 8)  # the report and plot docs/audit.md shows


@pytest.fixture(scope="module")
def audits():
    """Every configuration of the table, audited once."""
    return {key: case.audit() for key, case in {**TRL_CASES, **VERL_CASES}.items()}


def model_audit(weight, *, micro_batches, dp_size, max_tokens, longest, width, equal_rows):
    """The audit of a formula: piece ``p``'s loss has gradient ``-A_i * weight(batch, split, piece, n_i)`` in
    each valid token of row ``i`` (before the ranks' average, which ``accumulate`` does)."""
    def step(batch, split):
        def run_piece(piece, inputs):
            n = inputs.mask.sum(-1, keepdim=True).to(inputs.logp.dtype)
            w = weight(batch, split, piece, n)
            return 0.0, -inputs.adv[:, None] * inputs.mask * w
        return accumulate(batch, split, run_piece, max_tokens)
    return audit_steps(step, micro_batches=micro_batches, dp_size=dp_size, max_tokens=max_tokens, seed=0,
                       longest=longest, width=width, equal_rows=equal_rows)


def assert_same_measure(got, want):
    assert got.candidates.keys() == want.candidates.keys()
    for name, (scale, residual) in want.candidates.items():
        assert got.candidates[name][0] == pytest.approx(scale, rel=1e-9, abs=1e-12), name
        assert got.candidates[name][1] == pytest.approx(residual, rel=1e-9, abs=1e-9), name
    assert got.split_error == pytest.approx(want.split_error, rel=1e-9, abs=1e-12)
    assert got.token_weight_by_length == pytest.approx(want.token_weight_by_length, rel=1e-9)
    assert got.token_weight_by_length_negative == pytest.approx(want.token_weight_by_length_negative, rel=1e-9)
    assert (got.aggregation, got.nearest, got.split_invariant) == (want.aggregation, want.nearest, want.split_invariant)


def generation_tokens(batch, split, piece, ga, spg):
    """TRL's num_items_in_batch for the piece's micro-batch: the loss tokens of its generation batch (all
    processes; grpo_trainer.py L2498), a generation being spg consecutive micro-steps; the audited step is
    the first of its generation and micro-steps past it repeat the step's (the audit's model)."""
    per_micro = [0] * ga
    for p in split.pieces:
        per_micro[p.micro_batch] += int(batch.mask[p.rows].sum())
    start = piece.micro_batch // spg * spg
    return sum(per_micro[s % ga] for s in range(start, start + spg))


def trl_weight(case, config_epsilon_high):
    """TRL 1.16 ``_compute_loss`` (grpo_trainer.py L3150-3182), on-policy, per token of one micro-batch."""
    ga, spg, procs = case.accumulation, case.per_generation, case.processes
    loss_type = case.loss_type
    cap = min(1.0, config_epsilon_high)  # cispo: clamp(ratio = 1, max=epsilon_high) (L3110)

    def weight(batch, split, piece, n):
        b = len(piece.rows)
        if loss_type in ("grpo", "sapo"):  # row means, .mean() over the micro-batch's rows, / GA
            return 1.0 / (n.clamp(min=1) * b * ga)
        if loss_type == "bnpo":  # the micro-batch's own token mean, / GA
            return 1.0 / (float(batch.mask[piece.rows].sum()) * ga)
        if loss_type == "dr_grpo":  # / (B * max_completion_length), / GA
            return 1.0 / (b * 512 * ga)
        if loss_type in ("dapo", "cispo", "vespo"):  # / (num_items / P * GA / spg)
            items = generation_tokens(batch, split, piece, ga, spg)
            w = 1.0 / (items / procs * ga / spg)
            return w * cap if loss_type == "cispo" else w
        if loss_type == "luspo":  # row sums, .mean() over rows, / GA
            return 1.0 / (b * ga)
        raise AssertionError(loss_type)
    return weight


# The configurations whose TRL 1.16 normaliser is exact, as read in the source: per-micro-batch row
# means with equal rows, Dr. GRPO's constant, LUSPO's row sums, and DAPO's num_items rescaled by GA/spg
# whenever no step spans two generations (GA <= spg here). cispo with the default epsilon_high (None,
# so epsilon = 0.2, grpo_trainer.py L946) caps every on-policy ratio of 1 at 0.2.
EXACT_TRL = {"grpo": "seq_mean_token_mean", "sapo": "seq_mean_token_mean", "dr_grpo": "constant",
             "luspo": "seq_mean_token_sum", "dapo": "token_mean", "vespo": "token_mean", "cispo": "token_mean"}


@pytest.mark.parametrize("key", list(TRL_CASES))
def test_trl_loss_types(audits, key):
    case = TRL_CASES[key]
    audit = audits[key]
    epsilon_high = case.options.get("epsilon_high", 0.2)
    want = model_audit(trl_weight(case, epsilon_high), micro_batches=case.accumulation, dp_size=case.processes,
                       max_tokens=512, longest=512, width=None, equal_rows=True)
    assert_same_measure(audit, want)
    spans_generations = case.accumulation > case.per_generation
    if case.loss_type == "bnpo" or (case.loss_type in ("dapo", "cispo", "vespo") and spans_generations):
        # a mean of per-micro-batch (bnpo, L3158) or per-generation (dapo-like, L3170-3172) token means
        assert audit.aggregation is None and not audit.split_invariant
        assert audit.split_error > 0.5 and audit.residual > 0.5
    else:
        assert audit.aggregation == EXACT_TRL[case.loss_type] and audit.split_invariant
        expected = min(1.0, epsilon_high) if case.loss_type == "cispo" else 1.0
        assert audit.scale == pytest.approx(expected, abs=1e-6)


def test_trl_cispo_default_cap_is_a_fifth(audits):
    assert audits[TrlCase("cispo", 2, 2).describe()].scale == pytest.approx(0.2, abs=1e-6)
    assert audits[TrlCase("cispo", 2, 2, 1, {"epsilon_high": 5.0}).describe()].scale == pytest.approx(1.0, abs=1e-6)


def verl_weight(case, micro_batches=2, dp_size=2):
    """verl 0.9.1: ``agg_loss`` (core_algos.py L1170-1205) with the engine's global counts, or the loss's own."""
    mode = case.loss_agg_mode
    if case.loss_mode == "sapo":
        mode = "seq-mean-token-mean"  # compute_policy_loss_sapo passes this mode whatever the config (L1689)

    def weight(batch, split, piece, n):
        tokens, rows = float(batch.mask.sum()), batch.mask.shape[0]
        if case.loss_mode == "geo_mean":  # torch.mean over the micro-batch's rows (L2000): no global count
            return 1.0 / (len(piece.rows) * n.clamp(min=1))
        if mode == "token-mean":
            return dp_size / tokens
        if mode == "token-sum":
            return float(dp_size)
        if mode == "seq-mean-token-mean":
            return dp_size / (rows * n.clamp(min=1))
        if mode == "seq-mean-token-sum":
            return dp_size / rows
        if mode == "seq-mean-token-sum-norm":
            return dp_size / (rows * (case.loss_scale_factor or 64))
        raise AssertionError(mode)
    return weight


EXACT_VERL = {"token-mean": "token_mean", "token-sum": "token_sum", "seq-mean-token-mean": "seq_mean_token_mean",
              "seq-mean-token-sum": "seq_mean_token_sum", "seq-mean-token-sum-norm": "constant"}


@pytest.mark.parametrize("key", list(VERL_CASES))
def test_verl_loss_agg_modes(audits, key):
    case = VERL_CASES[key]
    audit = audits[key]
    max_tokens = case.loss_scale_factor or 64
    want = model_audit(verl_weight(case), micro_batches=2, dp_size=2, max_tokens=max_tokens, longest=64, width=64,
                       equal_rows=not case.dynamic_bsz)
    assert_same_measure(audit, want)
    if case.loss_mode == "vanilla":
        assert audit.aggregation == EXACT_VERL[case.loss_agg_mode] and audit.split_invariant
        assert audit.scale == pytest.approx(1.0, abs=1e-6)
    elif case.loss_mode == "sapo":  # asked token-mean, optimises GRPO's per-response mean
        assert audit.aggregation == "seq_mean_token_mean" and audit.scale == pytest.approx(1.0, abs=1e-6)
    elif case.dynamic_bsz:  # geo_mean: a mean of micro-batch means over uneven micro-batches
        assert audit.aggregation is None and not audit.split_invariant and audit.split_error > 0.5
    else:  # geo_mean, equal micro-batches: GMPO's mean, once per micro-batch
        assert audit.aggregation == "seq_mean_token_mean" and audit.scale == pytest.approx(2.0, abs=1e-6)


def test_rlloss_verl_gmpo_is_exact_where_geo_mean_is_not():
    import rlloss.integrations.verl  # noqa: F401  -- registers rlloss_gmpo
    from rlloss.audit import audit_verl

    config = VerlCase("token-mean", loss_mode="rlloss_gmpo").config()
    audit = audit_verl(config)
    assert audit.aggregation == "seq_mean_token_mean" and audit.scale == pytest.approx(1.0, abs=1e-6)
    assert audit.split_invariant


def test_docs_table_is_what_the_trainers_measure(audits):
    page = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    block = page.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    want = [row(case, audits[key]) for key, case in TRL_CASES.items()]
    want += [row(case, audits[key]) for key, case in VERL_CASES.items()]
    assert rows == want, "docs/audit.md's table is stale: python -m rlloss.audit table --update docs/audit.md"
    assert re.search(r"Measured \d{4}-\d{2}-\d{2} with trl 1\.16\.0, transformers [\d.]+, verl 0\.9\.1", block)


def test_docs_report_is_what_trl_measures():
    page = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    report = audit_trl(DAPO_DOCS.config()).report()
    assert report in page, "docs/audit.md's DAPO report is stale: rerun the command above it"


@pytest.mark.parametrize("loss_type, ga, spg", [("dapo", 4, 2), ("bnpo", 2, 2), ("grpo", 2, 4), ("cispo", 2, 2)])
def test_rlloss_trl_trainer_audits_as_trl(loss_type, ga, spg):
    """rlloss's GRPOTrainer reproduces TRL's normalisers, departures included."""
    config = TrlCase(loss_type, ga, spg).config()
    stock = audit_trl(config)
    ours = audit_trl(config, trainer_cls=rlloss.integrations.trl.GRPOTrainer)
    assert_same_measure(ours, stock)


@pytest.mark.parametrize("ga, spg", [(4, 2), (2, 4)])
def test_trl_loop_counts_generation_batches_as_the_audit_does(tmp_path, ga, spg):
    """TRL's own train loop: num_items_in_batch is the loss tokens of the micro-step's generation batch
    (spg consecutive micro-steps), old log-probs come exactly when GA % spg != 0, and the loop sets
    current_gradient_accumulation_steps to GA: the audit's model of what reaches _compute_loss."""
    from rlloss.audit.trl import build_trainer

    config = trl.GRPOConfig(output_dir=str(tmp_path), loss_type="dapo", gradient_accumulation_steps=ga,
                            steps_per_generation=spg, per_device_train_batch_size=2, num_generations=2,
                            max_completion_length=12, max_steps=2, use_cpu=True, bf16=False, report_to=[],
                            temperature=4.0, logging_steps=100)  # hot: EOS comes early in some rows
    trainer = build_trainer(config, tmp_path)
    seen = []
    original = trainer._compute_loss

    def recording(model, inputs):
        seen.append((int(inputs["completion_mask"].sum()), int(inputs["num_items_in_batch"]),
                     "old_per_token_logps" in inputs, trainer.current_gradient_accumulation_steps))
        return original(model, inputs)

    trainer._compute_loss = recording
    torch.manual_seed(0)
    trainer.train()
    assert len(seen) == 2 * ga
    for s, (_, items, old, current) in enumerate(seen):
        start = s // spg * spg
        assert items == sum(tokens for tokens, *_ in seen[start:start + spg])
        assert old == (ga % spg != 0) and current == ga
    assert len({tokens for tokens, *_ in seen}) > 1  # micro-batches of different token counts: a real check


@pytest.mark.parametrize("args, expect", [
    (["trl", "--loss-type", "dapo", "--gradient-accumulation-steps", "4", "--steps-per-generation", "8"],
     "effective objective: sum_i sum_t l_it*M_it / N_tok"),
    (["verl", "--loss-agg-mode", "seq-mean-token-sum-norm", "--micro-batches", "3"],
     "sum_i sum_t l_it*M_it / (N_seq * 64)"),
])
def test_command_line_prints_the_report_and_writes_the_plot(tmp_path, args, expect):
    plot = tmp_path / "audit.png"
    out = subprocess.run([sys.executable, "-m", "rlloss.audit", *args, "--plot", str(plot)], capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert expect in out.stdout and "split-invariant: yes" in out.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"
    print(out.stderr.strip().splitlines()[-1])  # the command's own time, for the record
