"""Log-probs, entropy and the policy loss straight from logits: values, gradients, both backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, assert_close, triton_runs_here

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
VOCABS = st.one_of(st.integers(1, 40), st.sampled_from([255, 1000, 4097]), st.integers(41, 3000))


def make_logits(b: int, t: int, v: int, dtype: torch.dtype, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=gen) * scale).to(DEVICE, dtype)
    ids = torch.randint(0, v, (b, t), generator=gen).to(DEVICE)
    return logits, ids


def logprobs_and_grads(logits, ids, temperature, backend, w_logp, w_ent):
    leaf = logits.detach().clone().requires_grad_(True)
    logp, entropy = rlloss.token_logprobs(leaf, ids, temperature=temperature, return_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad((logp * w_logp).sum() + (entropy * w_ent).sum(), leaf)
    return logp, entropy, grad


@needs_triton
@given(b=st.integers(1, 3), t=st.integers(1, 6), v=VOCABS, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.sampled_from([0.0, 1.0, 30.0]), temperature=st.sampled_from([1.0, 0.6, 1.7]), seed=st.integers(0, 2**31 - 1))
@example(b=1, t=1, v=1, dtype=torch.float32, scale=1.0, temperature=1.0, seed=0)
@example(b=2, t=3, v=4097, dtype=torch.bfloat16, scale=300.0, temperature=1.0, seed=1)
def test_triton_matches_reference(b, t, v, dtype, scale, temperature, seed):
    if dtype == torch.float16:
        scale = min(scale, 30.0)
    logits, ids = make_logits(b, t, v, dtype, scale, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w_logp, w_ent = torch.randn(b, t, generator=gen).to(DEVICE), torch.randn(b, t, generator=gen).to(DEVICE)
    ref = logprobs_and_grads(logits, ids, temperature, "torch", w_logp, w_ent)
    got = logprobs_and_grads(logits, ids, temperature, "triton", w_logp, w_ent)
    # logsumexp over V terms: rounding relative to the largest |z|, not to the (small) result
    z_scale = float(logits.float().abs().max()) / temperature + 1.0
    assert_close(got[0], ref[0], torch.float32, scale=z_scale, what="logp")
    assert_close(got[1], ref[1], torch.float32, scale=z_scale, what="entropy")
    grad_scale = float((w_logp.abs() + w_ent.abs() * z_scale).max()) / temperature
    assert_close(got[2], ref[2], dtype, scale=grad_scale, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_with_float64_log_softmax(backend, dtype):
    logits, ids = make_logits(3, 5, 2999, dtype, 8.0, seed=3)
    logp, entropy = rlloss.token_logprobs(logits, ids, temperature=0.9, return_entropy=True, backend=backend)
    exact = torch.log_softmax(logits.double() / 0.9, -1)
    want_logp = exact.gather(-1, ids[..., None]).squeeze(-1)
    want_ent = -(exact.exp() * exact).sum(-1)
    torch.testing.assert_close(logp.double(), want_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy.double(), want_ent, rtol=0, atol=2e-5)


def test_known_values():
    # V=2, logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]], device=DEVICE)
    for backend in BACKENDS:
        logp, entropy = rlloss.token_logprobs(logits, torch.tensor([[1]], device=DEVICE), return_entropy=True,
                                              backend=backend)
        assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
        assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def test_gradcheck_reference():
    logits, ids = make_logits(2, 3, 5, torch.float64, 2.0, seed=0)
    leaf = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: rlloss.token_logprobs(x, ids, temperature=0.7, return_entropy=True, backend="torch"), (leaf,))


def from_logits(logits, ids, old, adv, mask, backend, inplace=False, **kw):
    leaf = logits.detach().clone().requires_grad_(True)
    x = leaf * 1.0  # a fresh activation, as a model's output would be
    out = rlloss.policy_loss_from_logits(x, ids, old, adv, mask, backend=backend, inplace_backward=inplace, **kw)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


def loss_inputs(b, t, v, dtype, seed):
    logits, ids = make_logits(b, t, v, dtype, 3.0, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logp = rlloss.token_logprobs(logits, ids, backend="torch")
    old = (logp + 0.3 * torch.randn(b, t, generator=gen).to(DEVICE)).to(dtype)
    adv = torch.randn(b, generator=gen).to(DEVICE)
    mask = torch.rand(b, t, generator=gen).to(DEVICE) < 0.7
    mask[0] = False  # an empty row
    ids = torch.where(mask, ids, torch.full_like(ids, -100))  # padding ids as HF writes them
    return logits, ids, old, adv, mask


@needs_triton
@given(b=st.integers(1, 4), t=st.integers(1, 9), v=VOCABS, dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1), options=st.sampled_from([
           {},
           {"aggregation": "seq_mean_token_mean", "entropy_coef": 0.01, "temperature": 0.7},
           {"aggregation": "constant", "max_tokens": 16, "level": "sequence"},
           {"eps_high": 0.28, "dual_clip": 3.0, "entropy_coef": 0.1},
       ]))
def test_policy_loss_from_logits_matches_reference(b, t, v, dtype, seed, options):
    logits, ids, old, adv, mask = loss_inputs(b, t, v, dtype, seed)
    ref, ref_grad = from_logits(logits, ids, old, adv, mask, "torch", **options)
    got, grad = from_logits(logits, ids, old, adv, mask, "triton", **options)
    assert_close(got.loss, ref.loss, torch.float32, scale=float(ref.loss.detach().abs()) + 1.0)
    for name in ref.metrics:
        assert_close(got.metrics[name], ref.metrics[name], torch.float32, scale=1.0, what=name)
    assert_close(grad, ref_grad, dtype, scale=float(ref_grad.float().abs().max()), what="logits grad")
    assert torch.all(grad[~mask] == 0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(dtype):
    logits, ids, old, adv, mask = loss_inputs(3, 7, 1001, dtype, seed=5)
    kw = {"aggregation": "seq_mean_token_mean", "entropy_coef": 0.05}
    _, separate = from_logits(logits, ids, old, adv, mask, "triton", inplace=False, **kw)
    _, inplace = from_logits(logits, ids, old, adv, mask, "triton", inplace=True, **kw)
    assert torch.equal(separate, inplace)
    # and the gradient really went into the logits buffer (no second [B, T, V] tensor)
    activation = logits.detach().clone().requires_grad_(True) * 1.0
    out = rlloss.policy_loss_from_logits(activation, ids, old, adv, mask, backend="triton", inplace_backward=True, **kw)
    out.loss.backward()
    assert torch.equal(activation.detach(), separate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_is_policy_loss_of_token_logprobs_minus_the_entropy_bonus(backend):
    logits, ids, old, adv, mask = loss_inputs(3, 6, 50, torch.float32, seed=2)
    coef = 0.02
    out = rlloss.policy_loss_from_logits(logits, ids, old, adv, mask, entropy_coef=coef, aggregation="token_mean",
                                         backend=backend)
    safe = torch.where(mask, ids, 0)
    logp, entropy = rlloss.token_logprobs(logits, safe, return_entropy=True, backend="torch")
    base = rlloss.policy_loss(logp, old, adv, mask, backend="torch")
    mean_entropy = entropy[mask].mean()
    assert_close(out.loss, base.loss - coef * mean_entropy, torch.float32, scale=1.0)
    assert_close(out.metrics["entropy_mean"], mean_entropy, torch.float32)


def test_uniform_logits_have_entropy_log_v():
    logits = torch.zeros(1, 2, 37, device=DEVICE)
    for backend in BACKENDS:
        _, entropy = rlloss.token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long, device=DEVICE),
                                           return_entropy=True, backend=backend)
        torch.testing.assert_close(entropy, torch.full((1, 2), math.log(37), device=DEVICE))


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda l, i: rlloss.token_logprobs(l, i.float()), TypeError, "ids"),
        (lambda l, i: rlloss.token_logprobs(l, i[:, :2]), ValueError, "ids"),
        (lambda l, i: rlloss.token_logprobs(l[0], i), ValueError, "logits"),
        (lambda l, i: rlloss.token_logprobs(l, i, temperature=0.0), ValueError, "temperature"),
        (lambda l, i: rlloss.token_logprobs(l, i + 100), ValueError, "ids"),
        (lambda l, i: rlloss.token_logprobs(l, i - 100), ValueError, "ids"),
        (lambda l, i: rlloss.policy_loss_from_logits(l, i, None, torch.ones(2, device=DEVICE),
                                                      torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
                                                      entropy_coef=-1.0), ValueError, "entropy_coef"),
    ],
)
def test_bad_input(call, error, words):
    logits, ids = make_logits(2, 3, 11, torch.float32, 1.0, seed=0)
    with pytest.raises(error, match=words):
        call(logits, ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_logits_are_a_masked_vocabulary(backend):
    logits = torch.tensor([[[0.0, 1.0, float("-inf"), 2.0]]], device=DEVICE).requires_grad_(True)
    logp, entropy = rlloss.token_logprobs(logits, torch.tensor([[1]], device=DEVICE), return_entropy=True,
                                          backend=backend)
    finite = torch.tensor([[[0.0, 1.0, 2.0]]], device=DEVICE)
    _, want = rlloss.token_logprobs(finite, torch.tensor([[1]], device=DEVICE), return_entropy=True, backend="torch")
    torch.testing.assert_close(entropy, want)
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), logits)
    assert torch.isfinite(grad).all() and grad[0, 0, 2].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["cispo", "vespo", "gmpo"])
def test_from_logits_takes_every_objective_and_modifier(backend, objective):
    logits, ids, old, adv, mask = loss_inputs(3, 6, 40, torch.float32, seed=4)
    weights = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kw = {"objective": objective, "token_weights": weights, "aggregation": "seq_mean_token_mean",
          "ref_logp": old, "beta": 0.04, "kl": "k3+"}
    out = rlloss.policy_loss_from_logits(logits, ids, old, adv, mask, backend=backend, **kw)
    logp = rlloss.token_logprobs(logits, torch.where(mask, ids, 0), backend="torch")
    want = rlloss.policy_loss(logp, old, adv, mask, backend="torch", **kw)
    assert_close(out.loss, want.loss, torch.float32, scale=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [rlloss.PPO(eps_low=3e-4, eps_high=4e-4, level="sequence"), rlloss.GMPO()])
def test_from_logits_bias_correction_through_row_statistics(backend, objective):
    """Sequence-level bias correction (GSPO) and GMPO with it, from logits: the loss and the logits'
    gradient are those of ``policy_loss`` on the reference's log-probs."""
    logits, ids, old, adv, mask = loss_inputs(3, 6, 40, torch.float32, seed=5)
    kw = {"objective": objective, "aggregation": "seq_mean_token_mean", "ref_logp": old - 0.3, "beta": 0.5,
          "kl_bias_correction": True}
    x = logits.detach().requires_grad_(True)
    out = rlloss.policy_loss_from_logits(x, ids, old, adv, mask, backend=backend, **kw)
    (grad,) = torch.autograd.grad(out.loss, x)
    y = logits.detach().requires_grad_(True)
    logp = rlloss.token_logprobs(y, torch.where(mask, ids, 0), backend="torch")
    want = rlloss.policy_loss(logp, old, adv, mask, backend="torch", **kw)
    (want_grad,) = torch.autograd.grad(want.loss, y)
    assert_close(out.loss, want.loss, torch.float32, scale=1.0)
    assert_close(grad, want_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_element_count_gives_a_0d_loss_with_the_entropy_bonus(backend):
    """policy_loss takes a count as a number or a one-element tensor; the entropy term must normalise
    with it the same way, or the loss becomes [1] on one backend and 0-d on the other."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen).to(DEVICE).requires_grad_(True)
    ids = torch.randint(0, 11, (2, 5), generator=gen).to(DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    adv = torch.randn(2, generator=gen).to(DEVICE)
    as_tensor = rlloss.policy_loss_from_logits(logits, ids, None, adv, mask, entropy_coef=0.01,
                                               num_tokens=torch.tensor([15.0], device=DEVICE), backend=backend).loss
    as_number = rlloss.policy_loss_from_logits(logits, ids, None, adv, mask, entropy_coef=0.01, num_tokens=15,
                                               backend=backend).loss
    assert as_tensor.shape == torch.Size([])
    assert_close(as_tensor, as_number, torch.float32)
