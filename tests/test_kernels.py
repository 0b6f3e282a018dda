"""Triton kernels against the PyTorch reference: forward values, metrics and gradients.

Run on CUDA tensors where a GPU is present, otherwise in Triton's interpreter on the CPU
(conftest sets ``TRITON_INTERPRET=1``). Gradients are compared away from the kinks of the
piecewise objective (a ratio within a few ulps of a clip bound, the dual bound or the log-ratio
clamp), where either one-sided derivative is right and two correct exp implementations may pick
different sides; the values there are continuous and are compared everywhere.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import rlloss
from helpers import DEVICE, assert_close, triton_runs_here
from rlloss._dispatch import resolve_backend
from strategies import (
    FLOAT_DTYPES,
    LossProblem,
    call_options,
    loss_magnitude,
    loss_options,
    loss_problems,
    make_problem,
)

pytestmark = pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")

KINK_RTOL = 1e-5


def near_kinks(problem: LossProblem, opts: dict, kw: dict) -> torch.Tensor:
    """[B, T] bool: tokens whose ratio (or log-ratio) sits at a kink of the objective."""
    with torch.no_grad():
        logp = torch.where(problem.mask, problem.logp.float(), 0.0)
        old = logp if problem.old_logp is None else torch.where(problem.mask, problem.old_logp.float(), 0.0)
        d = logp - old
        if opts.get("level") == "sequence":
            d = (d.sum(-1) / problem.mask.sum(-1).clamp(min=1))[:, None].expand_as(d)
        limit = kw.get("max_log_ratio", 20.0)
        ratio = torch.exp(d.clamp(-limit, limit))
        eps_low = opts.get("eps_low", 0.2)
        eps_high = eps_low if opts.get("eps_high") is None else opts["eps_high"]
        bounds = [1 - eps_low, 1 + eps_high] + ([opts["dual_clip"]] if opts.get("dual_clip") else [])
        near = torch.zeros_like(problem.mask)
        for b in bounds:
            near |= (ratio - b).abs() <= KINK_RTOL * b
        near |= (d.abs() - limit).abs() <= KINK_RTOL * limit
        if "ref_logp" in kw:
            x = (kw["ref_logp"].float() - logp).abs()
            near |= (x - 20.0).abs() <= KINK_RTOL * 20
        return near & problem.mask


def run(problem: LossProblem, backend: str, kw: dict):
    leaf = problem.fresh_logp()
    out = rlloss.policy_loss(leaf, problem.old_logp, problem.adv, problem.mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


def gradient_magnitude(problem: LossProblem, kw: dict, ref_grad: torch.Tensor) -> torch.Tensor:
    """|surrogate gradient| + |KL gradient| per token: where the two cancel, rounding is relative to
    the terms, not to their small sum."""
    if not kw.get("beta"):
        return torch.zeros_like(ref_grad)
    _, surrogate_grad = run(problem, "torch", {**kw, "beta": 0.0})
    return surrogate_grad.abs() + (ref_grad - surrogate_grad).abs()


def compare_policy_loss(problem: LossProblem, opts: dict, kw: dict) -> None:
    ref, ref_grad = run(problem, "torch", kw)
    got, grad = run(problem, "triton", kw)
    what = f"{problem.description} {opts}"
    assert_close(got.loss, ref.loss, torch.float32, scale=loss_magnitude(problem, kw), what=what + " loss")
    assert set(got.metrics) == set(ref.metrics)
    for name in ref.metrics:
        assert_close(got.metrics[name], ref.metrics[name], torch.float32, scale=float(ref.metrics[name].abs()) + 1e-6,
                     what=f"{what} {name}")
    off = ~near_kinks(problem, opts, kw)
    assert grad.dtype == problem.dtype
    magnitude = gradient_magnitude(problem, kw, ref_grad)
    assert_close(grad[off], ref_grad[off], problem.dtype, scale=magnitude[off], what=what + " grad")
    assert torch.all(grad[~problem.mask] == 0)


@given(problem=loss_problems(), opts=loss_options())
@example(problem=make_problem(1, 1, torch.float32, seed=0), opts={"aggregation": "token_mean"})
@example(problem=make_problem(1, 3000, torch.bfloat16, seed=1, mask_kind="prefix", spread=30.0),
         opts={"aggregation": "seq_mean_token_mean", "beta": 0.04, "use_ref": True})
@example(problem=make_problem(5, 2049, torch.float16, seed=2, mask_kind="empty_rows", adv_kind="token"),
         opts={"aggregation": "constant", "max_tokens": 4096, "level": "sequence", "dual_clip": 3.0})
@example(problem=make_problem(3, 17, torch.float32, seed=3, mask_kind="all_masked"), opts={"aggregation": "seq_mean_token_sum"})
def test_policy_loss_matches_reference(problem, opts):
    compare_policy_loss(problem, opts, call_options(problem, opts))


@given(problem=loss_problems(max_b=4, max_t=600), opts=loss_options(), data=st.data())
def test_policy_loss_with_global_counts_matches_reference(problem, opts, data):
    kw = call_options(problem, opts)
    as_tensor = data.draw(st.booleans(), label="counts as tensors")
    n_tok = data.draw(st.integers(0, 5000), label="num_tokens")
    n_seq = data.draw(st.integers(0, 64), label="num_seqs")
    kw.update(num_tokens=torch.tensor(n_tok, device=DEVICE) if as_tensor else n_tok,
              num_seqs=torch.tensor(float(n_seq), device=DEVICE) if as_tensor else n_seq,
              dp_size=data.draw(st.integers(1, 8), label="dp_size"))
    compare_policy_loss(problem, opts, kw)


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "transposed":
        return x.t().contiguous().t()
    wide = torch.zeros((x.shape[0], 2 * x.shape[1]), dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


@pytest.mark.parametrize("layout", ["transposed", "every_other"])
def test_non_contiguous_inputs(layout):
    p = make_problem(4, 37, torch.bfloat16, seed=5, adv_kind="token", spread=0.3)
    kw = {"ref_logp": strided(p.ref_logp, layout), "beta": 0.04, "aggregation": "seq_mean_token_mean"}
    base, base_grad = run(p, "torch", {**kw, "ref_logp": p.ref_logp})
    leaf = strided(p.logp.detach(), layout).requires_grad_(True)
    out = rlloss.policy_loss(leaf, strided(p.old_logp, layout), strided(p.adv, layout), strided(p.mask, layout),
                             backend="triton", **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert_close(out.loss, base.loss, torch.float32)
    assert_close(grad, base_grad, torch.bfloat16)


@given(problem=loss_problems(max_t=800), opts=loss_options(), seed=st.integers(0, 2**31 - 1))
def test_clipped_surrogate_matches_reference(problem, opts, seed):
    kw = {k: opts[k] for k in ("eps_low", "eps_high", "dual_clip", "level")}
    upstream = torch.randn(problem.logp.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        leaf = problem.fresh_logp()
        per_token = rlloss.clipped_surrogate(leaf, problem.old_logp, problem.adv, problem.mask, backend=backend, **kw)
        (grad,) = torch.autograd.grad(per_token, leaf, upstream)
        results[backend] = (per_token, grad)
    (ref, ref_grad), (got, grad) = results["torch"], results["triton"]
    assert_close(got, ref, torch.float32, what=problem.description)
    off = ~near_kinks(problem, opts, kw)
    assert_close(grad[off], ref_grad[off], problem.dtype, what=problem.description)


@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dtype=st.sampled_from(FLOAT_DTYPES),
       kind=st.sampled_from(["k1", "k2", "k3"]), spread=st.sampled_from([0.0, 0.1, 3.0, 50.0]),
       seed=st.integers(0, 2**31 - 1))
def test_kl_estimate_matches_reference(shape, dtype, kind, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(shape, generator=gen) * 5).to(DEVICE, dtype)
    ref_logp = (logp.float() + spread * torch.randn(shape, generator=gen).to(DEVICE)).to(dtype)
    upstream = torch.randn(shape, generator=gen).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        leaf = logp.detach().clone().requires_grad_(True)
        value = rlloss.kl_estimate(leaf, ref_logp, kind=kind, backend=backend)
        (grad,) = torch.autograd.grad(value, leaf, upstream)
        results[backend] = (value, grad)
    (ref, ref_grad), (got, grad) = results["torch"], results["triton"]
    assert_close(got, ref, torch.float32)
    at_clamp = ((ref_logp.float() - logp.float()).abs() - 20).abs() <= KINK_RTOL * 20
    assert_close(grad[~at_clamp], ref_grad[~at_clamp], dtype)


@given(shape=st.lists(st.integers(1, 30), min_size=1, max_size=3), dtype=st.sampled_from(FLOAT_DTYPES),
       data=st.data(), seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.0, 0.3, 1.0]))
def test_masked_mean_matches_reference(shape, dtype, data, seed, density):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(shape, generator=gen) < density).to(DEVICE)
    dim = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)), label="dim")
    out_shape = torch.Size([]) if dim is None else x.sum(dim).shape
    normalizer = data.draw(st.sampled_from(["count", "number", "tensor", "zero"]), label="normalizer")
    norm = {"count": None, "number": 3.5, "zero": 0.0,
            "tensor": torch.rand(out_shape, generator=gen).to(DEVICE) * 4}[normalizer]
    upstream = torch.randn(out_shape, generator=gen).to(DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        leaf = x.detach().clone().requires_grad_(True)
        value = rlloss.masked_mean(leaf, mask, dim, normalizer=norm, backend=backend)
        (grad,) = torch.autograd.grad(value, leaf, upstream)
        results[backend] = (value, grad)
    (ref, ref_grad), (got, grad) = results["torch"], results["triton"]
    scale = float(x.float().abs().sum()) / max(float(x.numel()), 1.0) * x.shape[0]
    assert_close(got, ref, torch.float32, scale=scale)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_bitwise_deterministic(level, dtype):
    p = make_problem(5, 2500, dtype, seed=11, adv_kind="token", spread=1.0)
    kw = {"ref_logp": p.ref_logp, "beta": 0.04, "level": level, "aggregation": "seq_mean_token_mean", "dual_clip": 3.0}
    first, first_grad = run(p, "triton", kw)
    second, second_grad = run(p, "triton", kw)
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first_grad, second_grad)
    assert all(torch.equal(first.metrics[k], second.metrics[k]) for k in first.metrics)


def test_backward_twice_with_retained_graph_gives_the_same_gradient():
    p = make_problem(3, 50, torch.bfloat16, seed=4)
    leaf = p.fresh_logp()
    out = rlloss.policy_loss(leaf, p.old_logp, p.adv, p.mask, backend="triton")
    (g1,) = torch.autograd.grad(out.loss, leaf, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss * 2, leaf)
    assert torch.equal(g2, (g1.float() * 2).to(g1.dtype))


def test_auto_backend_picks_triton_exactly_on_cuda():
    x = torch.zeros(2, 2, device=DEVICE)
    assert resolve_backend("auto", x) == ("triton" if DEVICE.type == "cuda" else "torch")
    assert resolve_backend("triton", x) == "triton"

