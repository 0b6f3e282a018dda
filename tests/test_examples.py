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
