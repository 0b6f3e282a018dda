"""Exact objectives under gradient accumulation and data parallelism (``rlloss.distributed``).

Three kinds of evidence:

- a real multi-process run: 2 processes on the CPU, gloo on 127.0.0.1, each rank holding uneven
  micro-batches of one global batch; summed micro-batch gradients, averaged over ranks as DDP does,
  equal the single-process full-batch gradient for every aggregation, with KL, on both backends;
- the same property on one process, over random partitions drawn by hypothesis;
- the naive local normalisation is biased on uneven micro-batches, so the property can fail.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, assert_close, gloo_rank, spawn_ranks
from rlloss.distributed import StepCounts, step_counts
from strategies import AGGREGATIONS, call_options, loss_magnitude, loss_options, loss_problems, make_problem

WORLD = 2
# Each child loops over every configuration: one spawn for the whole file.
SPAWN_TIMEOUT_S = 240.0

# ---------------------------------------------------------------------------------------------
# The global batch of the multi-process test, rebuilt identically by the parent and each rank.
# ---------------------------------------------------------------------------------------------

B_GLOBAL, T = 11, 23
# Rank 0 holds 8 rows in micro-batches of 3, 1 and 4; rank 1 holds 3 rows in micro-batches of 2 and 1.
RANK_MICRO: tuple[tuple[tuple[int, int], ...], ...] = (((0, 3), (3, 4), (4, 8)), ((8, 10), (10, 11)))


@dataclasses.dataclass(frozen=True)
class Config:
    aggregation: str
    backend: str
    beta: float = 0.04
    level: str = "token"
    dual_clip: float | None = None
    count_empty_rows: bool = True

    @property
    def name(self) -> str:
        return (f"{self.aggregation}-{self.backend}-beta{self.beta}-{self.level}"
                f"{'-dual' if self.dual_clip else ''}{'' if self.count_empty_rows else '-nonempty'}")

    def loss_kwargs(self, ref_logp: torch.Tensor) -> dict:
        kw = {"aggregation": self.aggregation, "beta": self.beta, "ref_logp": ref_logp, "eps_high": 0.28,
              "level": self.level, "dual_clip": self.dual_clip, "backend": self.backend}
        if self.aggregation == "constant":
            kw["max_tokens"] = T
        return kw


def configs(backends: list[str]) -> list[Config]:
    out = []
    for backend in backends:
        out += [Config(agg, backend) for agg in AGGREGATIONS]
        out += [Config("seq_mean_token_mean", backend, level="sequence", dual_clip=3.0, count_empty_rows=False),
                Config("token_mean", backend, beta=0.0, dual_clip=3.0)]
    return out


def global_batch(seed: int = 1234) -> dict[str, torch.Tensor]:
    """Right-padded rows of uneven lengths (one empty), off-policy, with a reference policy."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B_GLOBAL, T, generator=gen) * 4 - 1e-3
    old = logp + torch.randn(B_GLOBAL, T, generator=gen) * 0.3
    ref = logp + torch.randn(B_GLOBAL, T, generator=gen) * 0.3
    adv = torch.randn(B_GLOBAL, generator=gen)
    lengths = torch.randint(1, T + 1, (B_GLOBAL,), generator=gen)
    lengths[5] = 0
    lengths[9] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "adv": adv, "mask": mask}


def full_batch(cfg: Config, batch: dict[str, torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-process loss and gradient of the whole batch, local (= global) counts."""
    leaf = batch["logp"].clone().requires_grad_(True)
    kw = cfg.loss_kwargs(batch["ref_logp"]) | {"backend": backend}
    if not cfg.count_empty_rows:
        kw["num_seqs"] = int(batch["mask"].any(-1).sum())
    out = rlloss.policy_loss(leaf, batch["old_logp"], batch["adv"], batch["mask"], **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out.loss.detach(), grad


def _rank_main(rank: int, port: int, out_dir: str, backends: list[str]) -> None:
    """One rank: step counts, micro-batch losses summed, gradients all-reduced and averaged (DDP)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors run in the interpreter
    import torch.distributed as dist

    with gloo_rank(rank, port, out_dir, WORLD):
        batch = global_batch()
        micro = RANK_MICRO[rank]
        results = {}
        for cfg in configs(backends):
            # One "model parameter" replicated on every rank, as DDP holds it: the log-prob table of
            # the global batch. This rank's data touches its own rows only.
            param = torch.nn.Parameter(batch["logp"].clone())
            calls = []
            real_all_reduce = dist.all_reduce
            dist.all_reduce = lambda *a, **k: (calls.append(1), real_all_reduce(*a, **k))[1]
            try:
                counts = step_counts([batch["mask"][lo:hi] for lo, hi in micro],
                                     count_empty_rows=cfg.count_empty_rows)
            finally:
                dist.all_reduce = real_all_reduce
            kw = cfg.loss_kwargs(batch["ref_logp"])
            total = torch.zeros(())
            for lo, hi in micro:
                mb_kw = kw | {"ref_logp": kw["ref_logp"][lo:hi]}
                out = rlloss.policy_loss(param[lo:hi], batch["old_logp"][lo:hi], batch["adv"][lo:hi],
                                         batch["mask"][lo:hi], **mb_kw, **counts.kwargs())
                out.loss.backward()  # gradients add up over micro-batches
                total = total + out.loss.detach()
            grad = param.grad.detach().clone()
            dist.all_reduce(grad)  # DDP: mean of the ranks' gradients
            grad /= WORLD
            dist.all_reduce(total)
            total /= WORLD
            res = {"grad": grad, "loss": total, "num_tokens": counts.num_tokens, "num_seqs": counts.num_seqs,
                   "dp_size": counts.dp_size, "collectives": len(calls)}
            if rank == 0:  # the single-process full-batch result on this backend, computed here too
                res["full_loss"], res["full_grad"] = full_batch(cfg, batch, cfg.backend)
            results[cfg.name] = res
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Spawn the 2 ranks once for every configuration; kill them and fail if they hang."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out_dir = tmp_path_factory.mktemp("ranks")
    backends = ["torch", "triton"] if rlloss._dispatch.triton_available() else ["torch"]
    results = spawn_ranks(_rank_main, WORLD, out_dir, SPAWN_TIMEOUT_S, backends)
    return dict(enumerate(results))


def _cfg_ids(cfgs: list[Config]) -> list[str]:
    return [c.name for c in cfgs]


@pytest.mark.parametrize("cfg", configs(BACKENDS), ids=_cfg_ids(configs(BACKENDS)))
def test_two_gloo_ranks_with_uneven_microbatches_give_the_full_batch_gradient(two_rank_results, cfg):
    batch = global_batch()
    full_loss, full_grad = full_batch(cfg, batch, "torch")  # the reference, in this (parent) process
    n_seq = B_GLOBAL if cfg.count_empty_rows else int(batch["mask"].any(-1).sum())
    for rank in range(WORLD):
        res = two_rank_results[rank][cfg.name]
        assert res["collectives"] == 1, "step_counts must reduce both counts in one collective"
        assert res["dp_size"] == WORLD
        assert res["num_tokens"].dtype == torch.int64 and res["num_tokens"].dim() == 0
        assert int(res["num_tokens"]) == int(batch["mask"].sum()) and int(res["num_seqs"]) == n_seq
        # every rank holds the same averaged gradient, and it is the full-batch gradient
        assert_close(res["grad"], full_grad, torch.float32, what=f"{cfg.name} rank {rank} grad")
        assert_close(res["loss"], full_loss, torch.float32, scale=abs(float(full_loss)) + 1.0,
                     what=f"{cfg.name} rank {rank} loss")
    same_backend = two_rank_results[0][cfg.name]
    assert_close(same_backend["full_grad"], full_grad, torch.float32,
                 what=f"{cfg.name}: {cfg.backend} full batch vs reference")
    assert_close(two_rank_results[0][cfg.name]["grad"], same_backend["full_grad"], torch.float32,
                 what=f"{cfg.name}: ranks vs {cfg.backend} full batch")


# ---------------------------------------------------------------------------------------------
# One process: the same property over random partitions (no process group: dp_size 1, then
# ranks simulated by giving every rank the counts of all micro-batches and dp_size = ranks).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=loss_problems(dtypes=(torch.float32,), max_b=8, max_t=80, informative=True), opts=loss_options(),
       data=st.data())
def test_step_counts_over_random_partitions_give_the_full_batch(backend, problem, opts, data):
    """Drawn so that the partition matters: two or more rows with signal, at least two micro-batches,
    a gradient that is not identically 0 (the one-row and empty cases: the two-rank test's
    configurations and ``test_properties.test_microbatch_split_of_degenerate_batches``)."""
    kw = call_options(problem, opts)
    b = problem.logp.shape[0]
    count_empty_rows = data.draw(st.booleans(), label="count_empty_rows")
    perm = data.draw(st.permutations(range(b)), label="row order")
    cuts = sorted(data.draw(st.lists(st.integers(1, b - 1), min_size=1, max_size=4, unique=True), label="cuts"))
    n_pieces = len(cuts) + 1
    ranks = data.draw(st.integers(1, min(2, n_pieces)), label="ranks")
    assume(check_partition(backend, problem, kw, count_empty_rows, perm, cuts, ranks))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("count_empty_rows", [True, False])
def test_step_counts_over_random_partitions_give_the_full_batch_fixed(backend, aggregation, count_empty_rows):
    """The property above on a written-out partition: 7 rows (one empty) in shuffled order, in micro-batches of
    2, 1, 3 and 1 rows over two ranks."""
    problem = make_problem(7, 13, torch.float32, seed=4, mask_kind="random", spread=0.3)
    problem.mask[3] = False
    kw = call_options(problem, {"aggregation": aggregation, "beta": 0.04, "use_ref": True,
                                **({"max_tokens": 9} if aggregation == "constant" else {})})
    assert check_partition(backend, problem, kw, count_empty_rows, [5, 0, 3, 6, 1, 4, 2], [2, 3, 6], 2)


def check_partition(backend, problem, kw, count_empty_rows, perm, cuts, ranks) -> bool:
    """The rows in order ``perm`` cut at ``cuts`` into micro-batches dealt to ``ranks`` ranks, with
    ``step_counts``: the full batch's loss and gradient. False (nothing checked) when the gradient is 0."""
    b = problem.logp.shape[0]
    full_kw = dict(kw)
    if not count_empty_rows:
        full_kw["num_seqs"] = int(problem.mask.any(-1).sum())
    leaf = problem.fresh_logp()
    full = rlloss.policy_loss(leaf, problem.old_logp, problem.adv, problem.mask, backend=backend, **full_kw)
    (full_grad,) = torch.autograd.grad(full.loss, leaf)
    if not bool((full_grad != 0).any()):
        return False
    bounds = [0, *cuts, b]
    pieces = [torch.tensor(perm[lo:hi], device=DEVICE) for lo, hi in zip(bounds[:-1], bounds[1:])]
    per_rank = [pieces[r::ranks] for r in range(ranks)]

    counts = step_counts([problem.mask[idx] for idx in pieces], count_empty_rows=count_empty_rows)
    assert counts.dp_size == 1  # no process group: this process is the whole step
    assert int(counts.num_tokens) == int(problem.mask.sum())
    counts = counts._replace(dp_size=ranks)  # what the all_reduce over `ranks` ranks would return
    leaf = problem.fresh_logp()
    total = torch.zeros((), device=DEVICE)
    for rank_pieces in per_rank:
        for idx in rank_pieces:
            mb_kw = dict(kw)
            if "ref_logp" in mb_kw:
                mb_kw["ref_logp"] = kw["ref_logp"][idx]
            old = None if problem.old_logp is None else problem.old_logp[idx]
            out = rlloss.policy_loss(leaf[idx], old, problem.adv[idx], problem.mask[idx], backend=backend,
                                     **mb_kw, **counts.kwargs())
            total = total + out.loss / ranks  # DDP averages the ranks' gradients
    (grad,) = torch.autograd.grad(total, leaf)
    assert_close(total, full.loss, torch.float32, scale=loss_magnitude(problem, full_kw), what=problem.description)
    assert_close(grad, full_grad, torch.float32, what=problem.description)  # element-wise: one micro-batch each
    return True


# ---------------------------------------------------------------------------------------------
# The naive local normalisation is biased: the property above can fail.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_local_counts_on_uneven_microbatches_are_biased(backend, aggregation):
    """A mean of micro-batch means (each normalised by its own counts) is not the full-batch
    objective when micro-batches are uneven; the step's counts are."""
    gen = torch.Generator().manual_seed(7)
    b, t = 6, 16
    lengths = torch.tensor([2, 16, 15, 14, 16, 13])  # one short row alone, then five long ones
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(DEVICE)
    logp = (-torch.rand(b, t, generator=gen) * 3 - 0.01).to(DEVICE)
    old = logp + 0.1 * torch.randn(b, t, generator=gen).to(DEVICE)
    adv = torch.tensor([2.0, -1.0, 0.5, -0.3, 0.8, -1.2], device=DEVICE)
    micro = [slice(0, 1), slice(1, b)]
    kw = {"aggregation": aggregation, "backend": backend}

    leaf = logp.clone().requires_grad_(True)
    full = rlloss.policy_loss(leaf, old, adv, mask, **kw).loss
    (full_grad,) = torch.autograd.grad(full, leaf)

    def accumulated(counts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = logp.clone().requires_grad_(True)
        losses = [rlloss.policy_loss(leaf[s], old[s], adv[s], mask[s], **kw, **counts).loss for s in micro]
        # local counts: trainers divide the sum by the number of micro-batches; global: plain sum
        total = sum(losses) / (len(micro) if not counts else 1)
        (grad,) = torch.autograd.grad(total, leaf)
        return total.detach(), grad

    naive, naive_grad = accumulated({})
    exact, exact_grad = accumulated(step_counts([mask[s] for s in micro]).kwargs())
    full = full.detach()
    tol = 1e-3 * (abs(float(full)) + 1.0)
    assert abs(float(naive) - float(full)) > 10 * tol, f"naive {float(naive)} vs full {float(full)}"
    assert float((naive_grad - full_grad).abs().max()) > 1e-3 * float(full_grad.abs().max())
    assert_close(exact, full, torch.float32, scale=1.0, what="step counts, loss")
    assert_close(exact_grad, full_grad, torch.float32, what="step counts, grad")


# ---------------------------------------------------------------------------------------------
# step_counts itself: values, types, single-process behaviour, errors.
# ---------------------------------------------------------------------------------------------


def test_step_counts_values_without_a_process_group():
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    m1 = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    m2 = torch.tensor([[0.5, 0.0, 2.0, -1.0]])  # numeric: non-zero is valid
    m3 = torch.zeros(0, 5, dtype=torch.bool)  # a micro-batch with no rows
    counts = step_counts([m1, m2, m3])
    assert isinstance(counts, StepCounts)
    assert counts.num_tokens.dtype == torch.int64 and counts.num_tokens.dim() == 0
    assert counts.num_seqs.dtype == torch.int64 and counts.num_seqs.dim() == 0
    assert (int(counts.num_tokens), int(counts.num_seqs), counts.dp_size) == (5, 3, 1)
    assert int(step_counts((m1, m2), count_empty_rows=False).num_seqs) == 2
    num_tokens, num_seqs, dp_size = counts  # unpacks like a tuple
    assert counts.kwargs() == {"num_tokens": num_tokens, "num_seqs": num_seqs, "dp_size": dp_size}
    assert rlloss.distributed.step_counts is step_counts and "distributed" in rlloss.__all__


def test_step_counts_errors_name_the_argument():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="masks"):
        step_counts([])
    with pytest.raises(TypeError, match=r"masks .*single tensor"):
        step_counts(mask)
    with pytest.raises(TypeError, match="masks"):
        step_counts(m for m in [mask])
    with pytest.raises(TypeError, match=r"masks\[1\]"):
        step_counts([mask, mask.tolist()])
    with pytest.raises(ValueError, match=r"masks\[1\] must be 2-D"):
        step_counts([mask, torch.ones(3)])
    with pytest.raises(TypeError, match=r"masks\[0\]"):
        step_counts([torch.ones(2, 2, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="one device"):
        step_counts([mask, torch.ones(2, 3, device="meta")])
    with pytest.raises(TypeError, match="count_empty_rows"):
        step_counts([mask], count_empty_rows=1)
    with pytest.raises(ValueError, match="group"):
        step_counts([mask], group=object())
