"""The example trainer (examples/length_bias.py) in its quick setting, on both backends.

What could fail: the trainer producing NaN/inf metrics, not learning an easy task, not being
reproducible for a seed, the Triton backend disagreeing with the reference inside a real training
step, or the command line not writing its logs and plot.
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "length_bias.py"


def _load():
    spec = importlib.util.spec_from_file_location("length_bias_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


lb = _load()
QUICK = lb.Config(**lb.QUICK)
# Always numbers; the length means are None in a step with no correct (or no incorrect) response.
NUMERIC = ("acc", "greedy_acc", "len_mean", "trunc_frac", "entropy", "entropy_answer", "clip_low", "clip_high",
           "kl", "loss", "keep_frac", "signal_frac", "samples", "rounds")
OPTIONAL = ("len_correct", "len_incorrect", "len_gap")


def _check_finite(rows):
    assert rows
    for row in rows:
        for key in NUMERIC:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)
        for key in OPTIONAL:
            assert row[key] is None or math.isfinite(row[key]), (key, row)
        assert 0 <= row["acc"] <= 1 and 0 <= row["keep_frac"] <= 1 and row["entropy"] >= 0
        assert row["kl"] >= -1e-6  # k3 >= 0; fp32 rounding of exp(x) - x - 1 near x = 0 may give -1e-9
        assert 1 <= row["len_mean"] <= QUICK.max_len


def _tail_mean(rows, key, n=10):
    return sum(r[key] for r in rows[-n:]) / n


def test_easy_setting_learns_above_chance():
    """Quick setting ((a+b) mod 3, 60 steps), torch backend: every recipe learns the answers."""
    chance = 1 / QUICK.modulus
    accs = {}
    for recipe in lb.MAIN:
        rows = lb.train_run(recipe, 0, QUICK)
        _check_finite(rows)
        assert len(rows) == QUICK.steps
        assert rows[0]["greedy_acc"] < chance + 0.15  # starts near or below chance
        accs[recipe] = _tail_mean(rows, "acc")
    assert all(a >= 0.5 for a in accs.values()), accs
    assert sum(accs.values()) / len(accs) >= 0.7, accs


def test_same_seed_same_log_and_other_seed_differs():
    cfg = dataclasses.replace(QUICK, steps=12)
    first = lb.train_run("dapo", 3, cfg)  # DAPO: dynamic sampling refills, overlong shaping
    second = lb.train_run("dapo", 3, cfg)
    assert first == second
    other = lb.train_run("dapo", 4, cfg)
    assert other != first


@pytest.mark.parametrize("recipe", lb.MAIN)
def test_triton_backend_matches_torch_in_training(recipe):
    """A few steps with every rlloss call on the Triton kernels (the interpreter on CPU)."""
    if not os.environ.get("TRITON_INTERPRET") and not lb.torch.cuda.is_available():
        pytest.skip("the Triton backend on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    pytest.importorskip("triton")
    cfg = dataclasses.replace(QUICK, steps=2, prompts=2, group=4, max_len=8, updates=2, micro=2)
    tri = lb.train_run(recipe, 0, dataclasses.replace(cfg, backend="triton"))
    ref = lb.train_run(recipe, 0, cfg)
    _check_finite(tri)
    # The first step samples from the same initial policy with the same generator: the batch is the
    # same, and the loss, metrics and entropy agree to float tolerance.
    for key in ("acc", "greedy_acc", "len_correct", "len_incorrect", "len_mean", "trunc_frac", "keep_frac",
                "signal_frac", "samples", "rounds"):
        assert tri[0][key] == ref[0][key], key
    for key in ("entropy", "entropy_answer", "clip_low", "clip_high", "kl", "loss"):
        assert tri[0][key] == pytest.approx(ref[0][key], rel=1e-4, abs=1e-5), key


def test_command_line_compare_writes_logs_and_plot(tmp_path):
    """``compare --quick`` through the command line and two worker processes, a few steps."""
    cmd = [sys.executable, str(SCRIPT), "compare", "--quick", "--steps", "4", "--seeds", "0", "1",
           "--workers", "2", "--out", str(tmp_path), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "compare-quick.json").read_text())
    assert record["config"]["steps"] == 4 and record["seeds"] == [0, 1] and record["recipes"] == lb.MAIN
    rows = lb.load_rows(record)
    assert len(rows) == 3 * 2 * 4
    _check_finite(rows)
    assert set(record["summary"]) == set(lb.MAIN)
    assert (tmp_path / "compare-quick.png").stat().st_size > 10_000
    assert len((tmp_path / "compare-quick.csv").read_text().splitlines()) == len(rows) + 1
    # The worker processes give the same log as a run in this process (same seed, one thread).
    torch = lb.torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = lb.train_run("dr_grpo", 1, dataclasses.replace(QUICK, steps=4))
    finally:
        torch.set_num_threads(threads)
    there = [r for r in rows if r["recipe"] == "dr_grpo" and r["seed"] == 1]
    assert lb.rounded(here) == there


# =============================================================================================
# examples/hf_grpo.py: a Hugging Face Qwen2 trained with generate + rlloss
# =============================================================================================

HF_SCRIPT = ROOT / "examples" / "hf_grpo.py"


def _load_hf():
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("hf_grpo_example", HF_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf():
    torch = lb.torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times cheaper on a shared CPU
    try:
        yield _load_hf()
    finally:
        torch.set_num_threads(threads)


def _hf_cfg(hf, recipe, **kw):
    return dataclasses.replace(hf.Config(), **{"recipe": recipe, "steps": 3, "prompts": 4, "group": 4, "warmup": 3,
                                               **kw})


@pytest.mark.parametrize("recipe", ["dr_grpo", "dapo"])
def test_hf_example_trains_a_few_finite_steps(hf, recipe):
    rows = hf.train(_hf_cfg(hf, recipe))
    assert len(rows) == 3
    for row in rows:
        assert all(math.isfinite(v) for v in row.values()), row
        assert 0 <= row["acc"] <= 1 and 0 <= row["truncated"] <= 1 and row["num_tokens"] >= 0


def _reference_step_loss(torch, model, sequences, prompt_len, eos, digit0, group, temperature, max_new_tokens,
                         recipe):
    """The first update's loss, by hand from the model's logits: plain torch, no rlloss.

    Returns (loss, the loss mask, the sampler-policy log-probs); fp64.
    """
    completions = sequences[:, prompt_len:]
    n = completions.shape[0]
    is_eos = completions == eos
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), completions.shape[1]))
    valid = torch.arange(completions.shape[1])[None, :] <= first_eos[:, None]
    ended = is_eos.any(1)
    answer = (sequences[:, 1] - digit0) + (sequences[:, 3] - digit0)
    r = ((completions[:, 0] == digit0 + answer) & ended).double()
    rg = r.view(-1, group)
    centred = (rg - rg.mean(1, keepdim=True)).view(-1)
    logits = model(input_ids=sequences).logits.double()[:, prompt_len - 1:-1] / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, torch.where(valid, completions, 0)[..., None])[..., 0]
    old = logp.detach()  # the first update: the policy that sampled is the one being trained
    ratio = torch.exp(logp - old)
    if recipe == "dr_grpo":
        adv, m, hi = centred, valid, 1.2
    else:  # DAPO: group-std advantages, overlong filter (no EOS), groups with mixed rewards only
        adv = centred / (rg.std(1, keepdim=True).repeat_interleave(group).view(-1) + 1e-6)
        mixed = (rg.max(1).values > rg.min(1).values).repeat_interleave(group)
        m, hi = valid & ended[:, None] & mixed[:, None], 1.28
    a = adv[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(0.8, hi) * a)
    total = torch.where(m, per_token, torch.zeros_like(per_token)).sum()
    loss = total / (n * max_new_tokens) if recipe == "dr_grpo" else (total / m.sum() if m.any() else total * 0)
    return loss, m, old


@pytest.mark.parametrize("recipe, from_hidden", [("dr_grpo", False), ("dapo", False), ("dapo", True)])
def test_hf_example_loss_on_the_first_batch_matches_a_hand_computed_reference(hf, recipe, from_hidden):
    """The example's accumulated loss (and gradient) of its first batch against plain torch, by hand; from
    the logits, and from the hidden states by the fused kernels (the loss path: the gradient formed in
    the forward, from logits tiles)."""
    torch = lb.torch
    # Dr. GRPO: a warmed-up model that ends early, so that generate's width W is below the budget and
    # a normaliser taken from W (not max_new_tokens) would show; DAPO: a shorter warm-up leaves
    # truncated responses for the overlong filter.
    cfg = _hf_cfg(hf, recipe, prompts=8, group=8, micro=3, warmup=10 if recipe == "dr_grpo" else 3,
                  from_hidden=from_hidden, backend="triton" if from_hidden else "auto")
    model = hf.build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    hf.warm_up(model, cfg, gen)
    batch = hf.sample_batch(model, cfg, gen)
    adv, mask = hf.prepare(batch, cfg)
    slices = hf.micro_slices(mask.shape[0], cfg.micro)
    counts = hf.rlloss.distributed.step_counts([mask[s] for s in slices])
    model.train()
    got = sum(hf.micro_loss(model, batch, adv, mask, s, counts, cfg).loss for s in slices)
    got_grads = torch.autograd.grad(got, list(model.parameters()))

    want, want_mask, old = _reference_step_loss(
        torch, model, batch["sequences"], hf.PROMPT_LEN, hf.EOS, hf.DIGIT0, cfg.group, cfg.temperature,
        cfg.max_new_tokens, recipe)
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    # something to train on in this batch: valid tokens, and rewards that differ within a group
    assert torch.equal(mask, want_mask) and bool(want_mask.any()) and bool(batch["rewards"].any())
    if recipe == "dr_grpo":
        assert batch["completions"].shape[1] < cfg.max_new_tokens
    else:
        assert bool(batch["truncated"].any()) and not bool(batch["truncated"].all())
    torch.testing.assert_close(batch["old_logp"], torch.where(want_mask | batch["mask"], old, 0).float(),
                               rtol=1e-5, atol=1e-5)
    assert got.dtype == torch.float32 and want.dtype == torch.float64
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-4, atol=1e-6)


def test_hf_example_old_logp_is_the_samplers(hf):
    """With top_k=0, top_p=1 and the same temperature, old_logp is log_softmax of generate's own scores;
    with generate's truncation on (here top_k=5), or another temperature, it is not."""
    torch = lb.torch
    cfg = _hf_cfg(hf, "dr_grpo")
    model = hf.build_model(cfg)
    model.eval()
    prompts, _ = hf.make_prompts(8, torch.Generator().manual_seed(1))
    cases = [({}, cfg.temperature, True),  # the example's settings
             ({"top_k": 5}, cfg.temperature, False),  # generate truncating the distribution
             ({}, 1.0, False)]  # log-probs at another temperature than the sampler's
    for change, temperature, same in cases:
        kw = {**hf.generate_kwargs(cfg), **change}
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), output_scores=True,
                                 return_dict_in_generate=True, **kw)
            completions = out.sequences[:, hf.PROMPT_LEN:]
            mask = hf.completion_mask(completions)
            sampler = torch.stack([torch.log_softmax(s.double(), -1).gather(-1, completions[:, j:j + 1])[:, 0]
                                   for j, s in enumerate(out.scores)], 1)
            ours = hf.rlloss.token_logprobs(hf.completion_logits(model, out.sequences), completions,
                                            temperature=temperature, mask=mask).double()
        close = torch.allclose(ours[mask], sampler[mask], rtol=1e-4, atol=1e-5)
        assert close == same, (change, temperature, (ours - sampler)[mask].abs().max())


def test_hf_example_command_line_runs(tmp_path):
    pytest.importorskip("transformers")
    cmd = [sys.executable, str(HF_SCRIPT), "--recipe", "dapo", "--steps", "2", "--prompts", "2", "--group", "4",
           "--warmup", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "num_tokens" in lines[0]
