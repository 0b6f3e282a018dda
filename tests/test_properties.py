"""Properties every backend must have, drawn by hypothesis over the shared strategies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, assert_close
from strategies import (
    AGGREGATIONS,
    LossProblem,
    call_options,
    loss_magnitude,
    loss_options,
    loss_problems,
    make_problem,
)

NAN = float("nan")


def loss_and_grad(problem: LossProblem, backend: str, logp: torch.Tensor | None = None, **kw):
    leaf = problem.fresh_logp() if logp is None else logp
    out = rlloss.policy_loss(leaf, problem.old_logp, problem.adv, problem.mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf, allow_unused=False)
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=loss_problems(), opts=loss_options())
def test_masked_positions_never_matter(backend, problem, opts):
    kw = call_options(problem, opts)
    clean, clean_grad = loss_and_grad(problem, backend, **kw)
    keep = problem.mask
    poison = lambda x: None if x is None else x.detach().masked_fill(~keep, NAN)  # noqa: E731
    leaf = poison(problem.logp).requires_grad_(True)
    if "ref_logp" in kw:
        kw["ref_logp"] = poison(kw["ref_logp"])
    adv = problem.adv if problem.adv.dim() == 1 else poison(problem.adv)
    out = rlloss.policy_loss(leaf, poison(problem.old_logp), adv, keep, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert torch.equal(out.loss, clean.loss), problem.description
    assert torch.equal(grad, clean_grad), problem.description
    assert torch.all(grad[~keep] == 0)
    for name, value in out.metrics.items():
        assert torch.equal(value, clean.metrics[name]), name


def split_loss_and_grad(problem: LossProblem, backend: str, kw: dict, per_rank: list[list[tuple[int, int]]]):
    """Sum over each rank's micro-batches (rows ``lo:hi``) with the step's global counts, mean over
    ranks as DDP does: (loss, gradient)."""
    ranks = len(per_rank)
    counts = {"num_tokens": problem.mask.sum(), "num_seqs": problem.logp.shape[0], "dp_size": ranks}
    leaf = problem.fresh_logp()
    total = torch.zeros((), dtype=torch.float64 if problem.dtype == torch.float64 else torch.float32, device=DEVICE)
    for rank_pieces in per_rank:
        for lo, hi in rank_pieces:
            kw_mb = dict(kw)
            if "ref_logp" in kw_mb:
                kw_mb["ref_logp"] = kw["ref_logp"][lo:hi]
            old = None if problem.old_logp is None else problem.old_logp[lo:hi]
            out = rlloss.policy_loss(leaf[lo:hi], old, problem.adv[lo:hi], problem.mask[lo:hi], backend=backend,
                                     **kw_mb, **counts)
            total = total + out.loss / ranks  # DDP averages the ranks' gradients
    (grad,) = torch.autograd.grad(total, leaf)
    return total, grad


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=loss_problems(max_b=8, informative=True), opts=loss_options(), data=st.data())
def test_microbatches_and_ranks_with_global_counts_sum_to_the_full_batch(backend, problem, opts, data):
    """Sum over micro-batches, mean over ranks (as DDP does), with the step's global counts and
    ``dp_size``: exactly the full-batch loss and gradient, for every aggregation.

    Drawn so that the split matters: two or more rows with signal, at least one cut, a gradient
    that is not identically 0 (the degenerate batches: ``test_microbatch_split_of_degenerate_batches``).
    Each gradient element comes from one micro-batch, so it is compared element-wise."""
    kw = call_options(problem, opts)
    full, full_grad = loss_and_grad(problem, backend, **kw)
    assume(bool((full_grad != 0).any()))
    b = problem.logp.shape[0]
    ranks = data.draw(st.integers(1, 2), label="ranks")
    cuts = sorted(data.draw(st.lists(st.integers(1, b - 1), min_size=1, max_size=3, unique=True), label="cuts"))
    bounds = [0, *cuts, b]
    pieces = list(zip(bounds[:-1], bounds[1:]))
    per_rank = [pieces[r::ranks] for r in range(ranks)]
    total, grad = split_loss_and_grad(problem, backend, kw, per_rank)
    assert_close(total, full.loss, torch.float32, scale=loss_magnitude(problem, kw), what=problem.description)
    assert_close(grad, full_grad, problem.dtype, what=problem.description)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_microbatches_and_ranks_with_global_counts_sum_to_the_full_batch_fixed(backend, aggregation):
    """The property above on a written-out batch: 6 rows of different lengths, an empty one, per-sequence
    advantages, off-policy and a k3 KL, split into three micro-batches of 1, 3 and 2 rows over two ranks."""
    problem = make_problem(6, 11, torch.float32, seed=9, mask_kind="random", spread=0.3)
    problem.mask[4] = False
    kw = call_options(problem, {"aggregation": aggregation, "eps_high": 0.28, "beta": 0.04, "use_ref": True,
                                **({"max_tokens": 7} if aggregation == "constant" else {})})
    full, full_grad = loss_and_grad(problem, backend, **kw)
    assert bool((full_grad != 0).any())
    total, grad = split_loss_and_grad(problem, backend, kw, [[(0, 1), (4, 6)], [(1, 4)]])
    assert_close(total, full.loss, torch.float32, scale=loss_magnitude(problem, kw), what=aggregation)
    assert_close(grad, full_grad, problem.dtype, what=aggregation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("case", ["one_row", "all_masked", "zero_adv", "one_nonempty_row"])
def test_microbatch_split_of_degenerate_batches(backend, aggregation, case):
    """The batches the split property no longer draws: one row (split into nothing), all masked and
    zero advantages (loss and gradient 0, never NaN), one non-empty row among empty ones."""
    b = 1 if case == "one_row" else 4
    mask_kind = {"all_masked": "all_masked", "one_nonempty_row": "full"}.get(case, "random")
    problem = make_problem(b, 9, torch.float32, seed=5, mask_kind=mask_kind, adv_kind="zero" if case == "zero_adv" else "seq")
    if case == "one_nonempty_row":
        problem.mask[1:] = False
    kw = {"aggregation": aggregation, **({"max_tokens": 7} if aggregation == "constant" else {})}
    full, full_grad = loss_and_grad(problem, backend, **kw)
    per_rank = [[(0, 1)]] if b == 1 else [[(0, 1), (3, 4)], [(1, 3)]]
    total, grad = split_loss_and_grad(problem, backend, kw, per_rank)
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    assert_close(total, full.loss, torch.float32, what=case)
    assert_close(grad, full_grad, torch.float32, what=case)
    if case in ("all_masked", "zero_adv"):
        assert float(full.loss.detach()) == 0.0 and not bool(full_grad.any())


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=loss_problems(max_t=300, informative=True), opts=loss_options(), data=st.data())
def test_permuting_sequences_permutes_results(backend, problem, opts, data):
    """Drawn so that a mixed-up row would show: two or more rows with signal, a permutation that
    moves rows, a gradient that is not identically 0."""
    kw = call_options(problem, opts)
    out, grad = loss_and_grad(problem, backend, **kw)
    assume(bool((grad != 0).any()))
    b = problem.logp.shape[0]
    order = data.draw(st.permutations(range(b)), label="permutation")
    if order == list(range(b)):  # the identity moves nothing: rotate instead
        order = order[1:] + order[:1]
    perm = torch.tensor(order, device=DEVICE)
    kw_p = dict(kw)
    if "ref_logp" in kw_p:
        kw_p["ref_logp"] = kw["ref_logp"][perm]
    leaf = problem.logp.detach()[perm].requires_grad_(True)
    old = None if problem.old_logp is None else problem.old_logp[perm]
    out_p = rlloss.policy_loss(leaf, old, problem.adv[perm], problem.mask[perm], backend=backend, **kw_p)
    (grad_p,) = torch.autograd.grad(out_p.loss, leaf)
    assert_close(out_p.loss, out.loss, torch.float32, scale=loss_magnitude(problem, kw), what=problem.description)
    assert_close(grad_p, grad[perm], problem.dtype, what=problem.description)
    per_token = rlloss.clipped_surrogate(problem.logp, problem.old_logp, problem.adv, problem.mask, backend=backend)
    per_token_p = rlloss.clipped_surrogate(leaf, old, problem.adv[perm], problem.mask[perm], backend=backend)
    assert_close(per_token_p, per_token[perm], torch.float32, what=problem.description)


def test_permuting_a_single_row_or_an_empty_batch_changes_nothing():
    """The degenerate batches the permutation property no longer draws."""
    for problem in (make_problem(1, 7, torch.float32, seed=2), make_problem(3, 7, torch.float32, seed=2,
                                                                            mask_kind="all_masked")):
        out, grad = loss_and_grad(problem, "torch")
        perm = torch.arange(problem.logp.shape[0] - 1, -1, -1, device=DEVICE)
        leaf = problem.logp.detach()[perm].requires_grad_(True)
        out_p = rlloss.policy_loss(leaf, problem.old_logp[perm], problem.adv[perm], problem.mask[perm],
                                   backend="torch")
        (grad_p,) = torch.autograd.grad(out_p.loss, leaf)
        assert torch.equal(out_p.loss, out.loss) and torch.equal(grad_p, grad[perm])


@pytest.mark.parametrize("backend", BACKENDS)
@given(n_groups=st.integers(1, 6), size=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from(["group", "batch", "none"]), baseline=st.sampled_from(["mean", "loo"]))
def test_permuting_samples_with_group_ids_permutes_advantages(backend, n_groups, size, seed, scale, baseline):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (n_groups * size,), generator=gen).float().to(DEVICE)
    ids = (torch.arange(n_groups * size) // size).to(DEVICE)
    perm = torch.randperm(n_groups * size, generator=gen).to(DEVICE)
    kw = {"scale": scale, "baseline": baseline, "backend": backend}
    adv = rlloss.group_advantages(rewards, ids, **kw)
    adv_p = rlloss.group_advantages(rewards[perm], ids[perm], **kw)
    assert_close(adv_p, adv[perm], torch.float32)
    contiguous = rlloss.group_advantages(rewards, group_size=size, **kw)
    assert_close(contiguous, adv, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@given(problem=loss_problems(dtypes=(torch.bfloat16, torch.float16), max_t=500), opts=loss_options())
def test_low_precision_inputs_are_upcast_not_computed_in_low_precision(backend, problem, opts):
    """16-bit inputs give exactly the fp32 result on their upcast values; the gradient is the fp32
    gradient rounded once to the input dtype (within one ulp of that dtype)."""
    kw = call_options(problem, opts)
    out, grad = loss_and_grad(problem, backend, **kw)
    up = lambda x: None if x is None else x.detach().float()  # noqa: E731
    kw32 = dict(kw)
    if "ref_logp" in kw32:
        kw32["ref_logp"] = up(kw["ref_logp"])
    leaf32 = up(problem.logp).requires_grad_(True)
    out32 = rlloss.policy_loss(leaf32, up(problem.old_logp), up(problem.adv), problem.mask, backend=backend, **kw32)
    (grad32,) = torch.autograd.grad(out32.loss, leaf32)
    assert out.loss.dtype == torch.float32 and grad.dtype == problem.dtype
    assert_close(out.loss, out32.loss, torch.float32, what=problem.description)
    assert_close(grad, grad32.to(problem.dtype), problem.dtype, what=problem.description)


def test_fp64_inputs_stay_fp64_in_the_reference():
    p = make_problem(2, 5, torch.float64, seed=0)
    out = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, backend="torch")
    assert out.loss.dtype == torch.float64


# --- float64 gradcheck of every differentiable reference ---------------------------------------

def _gradcheck_problem(b: int = 3, t: int = 5, adv_kind: str = "seq") -> LossProblem:
    """Log-ratios kept away from the kinks (clip bounds at ±0.2, clamp at ±20), where finite
    differences of a piecewise function are meaningless."""
    gen = torch.Generator().manual_seed(1234)
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 - 0.1
    choices = torch.tensor([-1.0, -0.05, 0.05, 1.0], dtype=torch.float64)
    d = choices[torch.randint(0, 4, (b, t), generator=gen)] + 0.01 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64) if adv_kind == "seq" else torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[0, 0] = True
    ref = logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    return LossProblem(logp.to(DEVICE).requires_grad_(True), (logp - d).to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                       ref.to(DEVICE), "gradcheck")


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("adv_kind", ["seq", "token"])
def test_gradcheck_policy_loss(aggregation, adv_kind):
    """Token level only: GSPO's sequence ratio holds a stop-gradient (sg of the row mean), so its
    gradient is by design not the derivative of its value; test_known_values checks it by hand."""
    level = "token"
    p = _gradcheck_problem(adv_kind=adv_kind)
    extra = {"max_tokens": 7} if aggregation == "constant" else {}

    def f(logp):
        return rlloss.policy_loss(logp, p.old_logp, p.adv, p.mask, ref_logp=p.ref_logp, beta=0.04, dual_clip=3.0,
                                  level=level, aggregation=aggregation, backend="torch", **extra).loss

    assert torch.autograd.gradcheck(f, (p.logp,))


def test_gradcheck_clipped_surrogate_k3_kl_and_masked_mean():
    p = _gradcheck_problem()
    assert torch.autograd.gradcheck(lambda x: rlloss.clipped_surrogate(x, p.old_logp, p.adv, p.mask, backend="torch"),
                                    (p.logp,))
    for kind in ("k1", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda x: rlloss.kl_estimate(x, p.ref_logp, kind=kind, backend="torch"), (p.logp,))
    assert torch.autograd.gradcheck(lambda x: rlloss.masked_mean(x, p.mask, backend="torch"), (p.logp,))
    assert torch.autograd.gradcheck(lambda x: rlloss.masked_mean(x, p.mask, 1, backend="torch"), (p.logp,))
    assert torch.autograd.gradcheck(lambda x: rlloss.masked_mean(x, p.mask, 0, normalizer=4.0, backend="torch"),
                                    (p.logp,))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("singleton", ["zero", "keep"])
def test_gradcheck_group_advantages(scale, baseline, singleton):
    rewards = torch.tensor([0.3, 1.2, -0.5, 2.0, 0.7, 0.1, 1.5], dtype=torch.float64, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 1], device=DEVICE)  # group 2 is a singleton
    assert torch.autograd.gradcheck(
        lambda r: rlloss.group_advantages(r, ids, baseline=baseline, scale=scale, singleton=singleton, backend="torch"),
        (rewards,),
    )

