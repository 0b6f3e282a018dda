"""The benchmark's code paths, run at a tiny size so they cannot rot (no speed is asserted).

The CUDA sweep adds the ``rlloss-triton`` contender; here it runs through Triton's interpreter on
CPU tensors, with the CPU clock, so every line of the sweep but the CUDA clock and memory meter
runs in CI. The contenders must compute the same objective, or the benchmark compares nothing.
What the report promises is checked on its record and its text: every total at least its parts,
every figure and speed-up with its spread, the noise warning, ``--help``'s contenders and formats,
a figure whose panels are the report's parts with tick labels that do not overlap.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, assert_close, triton_runs_here

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_hidden  # noqa: E402
import bench_loss  # noqa: E402
import harness  # noqa: E402
import plot_memory  # noqa: E402
import plots  # noqa: E402
import problems  # noqa: E402
import summary  # noqa: E402
from spread import NOISY_RATIO, Ratio, Spread  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")


def with_binding_clips(inputs: dict[str, torch.Tensor], eps_low: float, eps_high: float) -> dict[str, torch.Tensor]:
    """The benchmark's inputs with log-ratios spread past both clip bounds (its own drift of 0.05
    never reaches them), and the share of valid tokens whose clip binds checked to be large."""
    gen = torch.Generator().manual_seed(1)
    old = inputs["old_logp"]
    regions = torch.tensor([-0.6, -0.25, -0.05, 0.05, 0.3, 0.7])
    d = regions[torch.randint(0, len(regions), old.shape, generator=gen)] * (1 + 0.1 * torch.rand(old.shape, generator=gen))
    out = {**inputs, "logp": old + d.to(old)}
    r, adv = torch.exp(d), inputs["adv"][:, None].cpu()
    binds = ((adv > 0) & (r > 1 + eps_high)) | ((adv < 0) & (r < 1 - eps_low))
    mask = inputs["mask"].cpu()
    assert int((binds & mask).sum()) >= 0.25 * int(mask.sum()), "the clips must bind on a fair share of tokens"
    return out


@pytest.mark.parametrize("recipe", list(bench_loss.RECIPES))
@pytest.mark.parametrize("kl", [False, True])
def test_contenders_compute_the_same_loss_and_gradient(recipe, kl):
    opts = bench_loss.RECIPES[recipe].loss_kwargs()
    inputs = with_binding_clips(problems.loss_inputs(4, 33, torch.float32, DEVICE), opts["eps_low"],
                                opts["eps_high"])
    results = {}
    for name in (bench_loss.BASELINE, "rlloss-torch", "rlloss-triton"):
        leaf = inputs["logp"].detach().clone().requires_grad_(True)
        loss = bench_loss.build(name, recipe, kl, inputs)(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
        results[name] = (loss, grad)
    ref_loss, ref_grad = results["rlloss-torch"]
    for name, (loss, grad) in results.items():
        assert_close(loss, ref_loss, torch.float32, what=name)
        assert_close(grad, ref_grad, torch.float32, what=name)


def assert_total_not_below_its_parts(row: dict) -> None:
    """Per phase: min <= q1 <= median <= q3 <= max; the total's statistics at least each part's."""
    spread = {p: Spread.from_dict(row["spread"][p]) for p in bench_loss.PHASES}
    for phase, s in spread.items():
        assert s.min <= s.q1 <= s.median <= s.q3 <= s.max, (phase, s)
        assert row["ms"][phase] == s.median
    for part in ("fwd", "bwd"):
        for stat in ("min", "q1", "median", "q3", "max"):
            assert getattr(spread["fwd+bwd"], stat) >= getattr(spread[part], stat), (part, stat, row)


def test_sweep_with_the_triton_contender_at_a_tiny_size():
    names = bench_loss.contenders(with_triton=True, with_compile=False)
    assert names[0] == bench_loss.BASELINE and "rlloss-triton" in names
    meter = harness.Meter(harness.CpuClock(), harness.cpu_peak_bytes, reps=3, warmup=0)
    rows = bench_loss.sweep(names, bench_loss.cases(((2, 16),), ["fp32", "bf16"], full=True), DEVICE, meter,
                            progress=False)
    assert len(rows) == len(names) * len(bench_loss.RECIPES) * 2 * 2
    for row in rows:
        assert set(row.ms) == set(bench_loss.PHASES)
        assert all(math.isfinite(v) and v > 0 for v in row.ms.values()), row
        assert row.peak_extra_bytes >= 0
        assert row.spread["fwd+bwd"]["n"] == 3
        assert_total_not_below_its_parts(dataclasses.asdict(row))
    text = bench_loss.table(rows, names)
    assert len(text.splitlines()) == len(rows) + 2


class ScriptedClock:
    """A clock that runs what it is handed and reports scripted (forward, backward) times."""

    label = "scripted"

    def __init__(self, steps: list[tuple[float, float]]) -> None:
        self.steps = list(steps)

    def split(self, first, then):
        then(first())
        return self.steps.pop(0)


def test_measure_times_each_step_as_its_forward_then_its_backward():
    """The total of a step is its forward plus its backward: a stalled forward (the 20 ms one) raises
    that step's total with it, so no total falls below its parts (timed in separate calls, a forward
    median of 14.8 ms sat beside a total of 1.26)."""
    steps = [(1.0, 2.0), (20.0, 2.5), (1.5, 3.0), (1.2, 2.0), (1.1, 9.0)]
    meter = harness.Meter(ScriptedClock(steps), lambda fn: fn() or 0, reps=len(steps), warmup=1)
    x = torch.randn(3, 4)
    calls = []

    def loss(leaf):
        calls.append(leaf.grad)
        return (leaf * 2).sum()

    spreads, _ = harness.measure(loss, x, meter)
    assert spreads["fwd"] == Spread(1.2, 1.1, 1.5, 1.0, 20.0, 5)
    assert spreads["bwd"] == Spread(2.5, 2.0, 3.0, 2.0, 9.0, 5)
    # the steps' totals: 3, 22.5, 4.5, 3.2, 10.1
    assert spreads["fwd+bwd"] == Spread(4.5, 3.2, 10.1, 3.0, 22.5, 5)
    assert all(g is None for g in calls), "each step starts with no gradient stored"


def test_spread_and_ratio_by_hand():
    peer = Spread.of([4.0, 6.0, 5.0, 5.5, 4.5])
    assert (peer.median, peer.q1, peer.q3, peer.min, peer.max) == (5.0, 4.5, 5.5, 4.0, 6.0)
    quiet = Ratio.of(peer, Spread.of([1.8, 1.9, 2.0, 2.1, 2.2]))
    assert quiet.median == pytest.approx(2.5)
    assert (quiet.low, quiet.high) == (pytest.approx(4.5 / 2.1), pytest.approx(5.5 / 1.9))
    assert not quiet.noisy and str(quiet) == "2.50x [2.14-2.89]"
    loud = Ratio.of(peer, Spread.of([1.0, 1.5, 2.0, 3.0, 4.0]))
    assert (loud.low, loud.high) == (pytest.approx(1.5), pytest.approx(5.5 / 1.5))
    assert loud.noisy and str(loud).endswith("?")
    assert Ratio(2.0, 1.0, NOISY_RATIO).noisy is False  # the bound itself is not too noisy
    with pytest.raises(ValueError, match="at least one sample"):
        Spread.of([])


def synthetic_record(noisy: bool) -> dict:
    """A record as bench_loss writes it, by hand: GRPO as published (+KL) at two sizes and without KL
    (not published: left out of the summary), two peers, and a from-hidden part whose contenders and
    keys are none of today's (the summary and the figure must read what the record holds)."""
    def row(recipe, kl, b, t, contender, samples, peak=2**20):
        sp = {"fwd": Spread.of([x / 3 for x in samples]), "bwd": Spread.of([2 * x / 3 for x in samples])}
        sp["fwd+bwd"] = Spread.of(samples)
        return {"recipe": recipe, "kl": kl, "dtype": "fp32", "b": b, "t": t, "contender": contender,
                "ms": {p: s.median for p, s in sp.items()}, "spread": {p: s.as_dict() for p, s in sp.items()},
                "peak_extra_bytes": peak, "tokens": b * t}

    rl = [1.0, 1.5, 2.0, 3.0, 4.0] if noisy else [1.8, 1.9, 2.0, 2.1, 2.2]
    rows = [row("GRPO", True, 64, 4096, "trl-inline", [8.0, 9.0, 10.0, 11.0, 12.0]),
            row("GRPO", True, 64, 4096, "other-peer", [4.0, 6.0, 5.0, 5.5, 4.5]),
            row("GRPO", True, 64, 4096, "rlloss-torch", rl),
            row("GRPO", True, 16, 1024, "trl-inline", [1.0] * 5),
            row("GRPO", True, 16, 1024, "rlloss-torch", [9.0] * 5),
            row("GRPO", False, 64, 4096, "trl-inline", [1.0] * 5),
            row("GRPO", False, 64, 4096, "rlloss-torch", [9.0] * 5)]
    hidden = {"measured_size": {"N": 64, "V": 512, "H": 32}, "measured_kind": "measured CPU",
              "measured": {"peer-head": {"ms": 30.0, "spread": Spread.of([28.0, 30.0, 32.0]).as_dict(),
                                         "peak_extra_bytes": 1},
                           "rlloss-new-path": {"ms": 10.0, "spread": Spread.of([9.0, 10.0, 11.0]).as_dict(),
                                               "peak_extra_bytes": 1},
                           "absent-peer": {"skipped": "absent is not installed; to run it: pip install absent"}},
              "counted_and_model": {"4096": {"peer-head": {"model_ms": 50.0}, "rlloss-new-path": {"model_ms": 20.0},
                                             "bound_3mm_ms": 15.0}},
              "model": {"V": 151936}}
    model = {"size": [8, 256], "rows": [{"recipe": "GRPO +KL", "dtype": "fp32", "backend": b, "launches": n,
                                         "bytes": by, "minimum_bytes": 1000} for b, n, by in
                                        (("trl-inline", 48, 21700), ("rlloss-torch", 151, 36200))]}
    return {"environment": {"kind": "measured on CPU (time.perf_counter)", "threads": 1, "device": "cpu",
                            "date": "2026-12-07T00:00:00+00:00"},
            "published_kl": {"GRPO": True}, "rows": rows, "hidden": hidden, "model": model,
            "logits_rows": [{"tokens": 256, "vocab": 4096, "contender": "rlloss-torch", "ms": {"fwd+bwd": 50.0},
                             "spread": {"fwd+bwd": Spread.of([45.0, 50.0, 55.0]).as_dict()},
                             "peak_extra_bytes": 2**26}]}


def test_summary_each_recipe_against_the_best_peer_with_its_range():
    record = synthetic_record(noisy=False)
    found = summary.entries(record, record["published_kl"])
    text = summary.render(record, found)
    policy = [e for e in found if e.part == "policy loss"]
    # the published recipe at its largest size only; the best peer is the faster one, other-peer
    assert [(e.case, e.peer, e.contender) for e in policy] == [("GRPO +KL fp32 64x4096", "other-peer", "rlloss-torch")]
    assert "2.50x [2.14-2.89]" in text
    hidden = [e for e in found if e.part == "from hidden states"]
    # quartiles of three runs (inclusive): 29, 31 and 9.5, 10.5: 29 / 10.5 = 2.76, 31 / 9.5 = 3.26
    assert [(e.peer, e.contender, str(e.ratio)) for e in hidden] == [("peer-head", "rlloss-new-path",
                                                                      "3.00x [2.76-3.26]")]
    assert "from logits: no peer ran" in text
    assert "WARNING" not in text
    for entry in (e.to_json() for e in found):
        assert entry["speedup_low"] <= entry["speedup"] <= entry["speedup_high"]


def test_summary_warns_when_the_machine_is_too_noisy():
    record = synthetic_record(noisy=True)
    text = summary.render(record, summary.entries(record, record["published_kl"]))
    assert "2.50x [1.50-3.67]?" in text
    warning = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "1 of 2" in warning[0] and "too noisy" in warning[0]


def test_the_figure_has_a_panel_per_part_log_axes_and_no_overlapping_tick_labels():
    pytest.importorskip("matplotlib")
    record = synthetic_record(noisy=False)
    fig = plots.figure(record, record["published_kl"])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_title()]
        assert [ax.get_title().split(":")[0] for ax in axes] == list(plots.PANELS)
        by_part = dict(zip(plots.PANELS, axes))
        for part in ("time", "time against tokens", "memory", "from logits", "from hidden states"):
            assert by_part[part].get_yscale() == "log", part
        for ax in axes:
            for axis in (ax.xaxis, ax.yaxis):
                boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels()
                         if t.get_visible() and t.get_text()]
                for i, a in enumerate(boxes):
                    for b in boxes[i + 1:]:
                        assert not a.overlaps(b), f"overlapping tick labels in {ax.get_title()!r}"
            for t in ax.yaxis.get_ticklabels():
                assert "$" not in t.get_text() and "e" not in t.get_text(), t.get_text()  # plain numbers
        # the hidden panel draws whatever contenders the record holds, and says what was not measured
        legend = [t.get_text() for t in by_part["from hidden states"].get_legend().get_texts()]
        assert legend == ["peer-head", "rlloss-new-path"]
        assert "absent-peer" in by_part["from hidden states"].get_xlabel()
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_help_lists_the_contenders_the_defaults_and_the_formats(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_loss.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in ("trl-inline", "rlloss-torch", "rlloss-compile", "rlloss-triton", "liger-triton", "trl-1.16",
                 *bench_hidden.CONTENDERS):
        assert name in text, name
    assert "--dtypes" in text and "fp32,bf16" in text and "comma-separated" in text
    assert "default: 15 on the CPU" in text and "16x1024, 64x4096" in text
    with pytest.raises(SystemExit) as exit_:
        bench_loss.main(["--dtypes", "fp32,fp64"])
    assert exit_.value.code == 2
    assert "--dtypes" in capsys.readouterr().err


def test_a_missing_package_says_how_to_install_it():
    reason = harness.skip_reason(ModuleNotFoundError("No module named 'trl'", name="trl"))
    assert 'pip install -e ".[trl]"' in reason and "trl==1.16.0" in reason and "transformers<5.11" in reason
    assert harness.skip_reason(RuntimeError("out of memory")) == "RuntimeError: out of memory"


def test_a_package_that_fails_while_importing_another_is_named(tmp_path, monkeypatch):
    """trl 1.16 imports transformers lazily inside its autograd function, and transformers < 5.11
    raises ValueError while importing when Hugging Face's kernels is 0.19: the line must name the
    importer and the package that raised, not only the ValueError."""
    site = tmp_path / "lib" / "site-packages"
    (site / "importer_pkg").mkdir(parents=True)
    (site / "importer_pkg" / "__init__.py").write_text("def run():\n    import raiser_pkg\n")
    (site / "raiser_pkg").mkdir()
    (site / "raiser_pkg" / "__init__.py").write_text("raise ValueError('Either a revision or a version')\n")
    monkeypatch.syspath_prepend(str(site))
    import importer_pkg

    with pytest.raises(ValueError) as caught:
        importer_pkg.run()
    reason = harness.skip_reason(caught.value)
    assert reason.startswith("importer_pkg does not import here: ValueError in raiser_pkg"), reason
    assert "pip install" in reason


def test_main_writes_the_record_the_figure_and_the_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert bench_loss.main(["--quick", "--no-compile", "--skip-model", "--no-progress", "--reps", "3",
                            "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"bench-{tag}-quick.json").read_text())
    env = record["environment"]
    for key in ("date", "command", "machine", "device", "torch", "threads", "kind"):
        assert env[key] not in (None, ""), key
    contenders = {r["contender"] for r in record["rows"]}
    assert {bench_loss.BASELINE, "rlloss-torch"} <= contenders
    for row in record["rows"] + record["logits_rows"]:
        assert_total_not_below_its_parts(row)
    assert (tmp_path / f"bench-{tag}-quick.png").stat().st_size > 0
    # the summary: each recipe as published against the best peer, every speed-up with its range
    entries = [e for e in record["summary"] if e["part"] == "policy loss"]
    assert sorted(e["case"].split(" fp32")[0].split(" bf16")[0] for e in entries if e["contender"] == "rlloss-torch") \
        == sorted(["GRPO +KL", "DAPO", "DAPO", "Dr. GRPO", "Dr. GRPO", "GRPO +KL"])
    for e in record["summary"]:
        assert e["speedup_low"] <= e["speedup"] <= e["speedup_high"], e
    out = capsys.readouterr().out
    text = out[out.index("SUMMARY"):]
    assert len(text.splitlines()) <= 30, "the summary fits one screen"
    assert text.count("x [") >= len(entries)
    # TRL's contender from hidden states ran, or its line says how to enable it
    trl = record["hidden"]["measured"]["trl-1.16"]
    assert "ms" in trl or 'pip install -e ".[trl]"' in trl["skipped"], trl


def test_the_memory_plot_draws_the_committed_record(tmp_path):
    # docs/speed-and-memory.md shows it beside the time plot: the record's memory, each recipe as published.
    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/bench-cpu.json").read_text())
    path = tmp_path / "bench-cpu.json"
    path.write_text(json.dumps(record))
    assert plot_memory.main([str(path)]) == 0
    assert (tmp_path / "bench-cpu-memory.png").stat().st_size > 0
    grid = plot_memory.panels(record["rows"])
    titles = [title for row in grid for title, _ in row]
    assert "GRPO +KL fp32" in titles and "DAPO fp32" in titles and not any("DAPO +KL" in t for t in titles)
    lines = dict(panel for row in grid for panel in row)["GRPO +KL fp32"]
    expected = sorted((r["tokens"], r["peak_extra_bytes"] / 2**20) for r in record["rows"]
                      if (r["recipe"], r["kl"], r["dtype"], r["contender"]) == ("GRPO", True, "fp32", "trl-inline"))
    assert len(expected) == 4 and sorted(lines["trl-inline"]) == expected


@pytest.mark.parametrize("recipe", list(bench_loss.RECIPES))
@pytest.mark.parametrize("kl", [False, True])
def test_the_compiled_contender_computes_the_reference(recipe, kl):
    """The compile contender calls the reference past validation with positional arguments: they must
    still be the ones policy_loss passes (checked uncompiled: compiling takes minutes on 2 cores)."""
    inputs = problems.loss_inputs(3, 17, torch.float32, DEVICE)
    direct = bench_loss.build("rlloss-compile", recipe, kl, inputs, compile=False)(inputs["logp"])
    public = bench_loss.build("rlloss-torch", recipe, kl, inputs)(inputs["logp"])
    assert torch.equal(direct, public)


def test_the_compiled_logits_contender_computes_the_reference():
    """The from-logits compile contender calls the references past validation: uncompiled, it must
    give what the public ``policy_loss_from_logits`` gives."""
    import bench_logits

    inputs = problems.logits_inputs(48, 256, DEVICE)
    direct = bench_logits.build("rlloss-compile", inputs, compile=False)(inputs["logits"])
    public = bench_logits.build("rlloss-torch", inputs)(inputs["logits"])
    assert torch.equal(direct, public)


def test_the_benchmark_modules_import_without_a_cycle():
    """Each script imports the shared modules (harness, problems, ...), never one that imports it back."""
    import ast

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    local = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        graph[path.stem] = names & local
    for script in ("bench_loss", "bench_logits"):
        assert {"harness", "problems"} <= graph[script], (script, graph[script])
    assert graph["spread"] == set(), "spread.py is a leaf"
    for reader in ("summary", "plots"):  # they read the record: no script, no measuring
        assert graph[reader] <= {"spread"}, (reader, graph[reader])

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph[start])

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not cycles, f"modules in an import cycle: {cycles}: {graph}"


def test_cpu_memory_meter_counts_each_allocation_once_at_its_time():
    """8 MiB made by aten::zeros (which allocates through aten::empty: nested ops), then a second
    8 MiB, the first freed, 4 MiB more: the peak is 16 MiB, not a multiple from nested ops."""
    from harness import cpu_peak_bytes

    mib = 2**20

    def steps():
        a = torch.zeros(2 * mib)  # 8 MiB of fp32
        b = torch.ones(2 * mib)
        del a
        c = torch.zeros(mib)
        return b, c

    assert cpu_peak_bytes(lambda: torch.zeros(2 * mib)) == 8 * mib
    assert cpu_peak_bytes(steps) == 16 * mib
