"""The benchmark's code paths, run at a tiny size so they cannot rot (nothing here is timed).

The CUDA sweep adds the ``rlloss-triton`` contender; here it runs through Triton's interpreter on
CPU tensors, with the CPU clock, so every line of the sweep but the CUDA clock and memory meter
runs in CI. The contenders must compute the same objective, or the benchmark compares nothing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import DEVICE, assert_close, triton_runs_here

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_loss  # noqa: E402
import harness  # noqa: E402
import plot_memory  # noqa: E402
import problems  # noqa: E402

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


def test_sweep_with_the_triton_contender_at_a_tiny_size():
    names = bench_loss.contenders(with_triton=True, with_compile=False)
    assert names[0] == bench_loss.BASELINE and "rlloss-triton" in names
    meter = harness.Meter(harness.CpuClock(), harness.cpu_peak_bytes, reps=1, warmup=0)
    rows = bench_loss.sweep(names, bench_loss.cases(((2, 16),), ["fp32", "bf16"], full=True), DEVICE, meter,
                            progress=False)
    assert len(rows) == len(names) * len(bench_loss.RECIPES) * 2 * 2
    for row in rows:
        assert set(row.ms) == set(bench_loss.PHASES)
        assert all(math.isfinite(v) and v > 0 for v in row.ms.values()), row
        assert row.peak_extra_bytes >= 0
    text = bench_loss.table(rows, names)
    assert len(text.splitlines()) == len(rows) + 2


def test_main_writes_the_record_and_the_plot(tmp_path):
    assert bench_loss.main(["--quick", "--no-compile", "--skip-model", "--no-progress", "--reps", "1",
                            "--warmup", "0", "--out-dir", str(tmp_path)]) == 0
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    record = json.loads((tmp_path / f"bench-{tag}-quick.json").read_text())
    env = record["environment"]
    for key in ("date", "command", "machine", "device", "torch", "threads", "kind"):
        assert env[key] not in (None, ""), key
    contenders = {r["contender"] for r in record["rows"]}
    assert {bench_loss.BASELINE, "rlloss-torch"} <= contenders
    assert (tmp_path / f"bench-{tag}-quick.png").stat().st_size > 0


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
    direct = bench_logits.build("compile", inputs, compile=False)(inputs["logits"])
    public = bench_logits.build("eager", inputs)(inputs["logits"])
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
