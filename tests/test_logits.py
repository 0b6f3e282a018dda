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
# written out, whatever hypothesis draws: spread-out softmaxes (the entropy's gradient is not ~0), temperatures
# below and above 1, one vocabulary block and several
@example(b=2, t=3, v=37, dtype=torch.float32, scale=1.0, temperature=0.6, seed=2)
@example(b=1, t=4, v=4097, dtype=torch.float32, scale=1.0, temperature=1.7, seed=3)
@example(b=3, t=2, v=255, dtype=torch.float16, scale=30.0, temperature=1.0, seed=4)
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
@example(b=3, t=5, v=37, dtype=torch.float32, seed=1,
         options={"aggregation": "seq_mean_token_mean", "entropy_coef": 0.01, "temperature": 0.7})
@example(b=2, t=4, v=4097, dtype=torch.bfloat16, seed=2, options={"eps_high": 0.28, "dual_clip": 3.0,
                                                                  "entropy_coef": 0.1})
@example(b=4, t=3, v=129, dtype=torch.float32, seed=3,
         options={"aggregation": "constant", "max_tokens": 16, "level": "sequence"})
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


# --- the entropy bonus with global counts and dp_size, against a float64 loop written from SPEC --------------


def _oracle_loss_with_entropy(logits: torch.Tensor, ids, old, adv, mask, *, temperature, entropy_coef, eps_low,
                              eps_high, level, aggregation, num_tokens=None, num_seqs=None, max_tokens=None,
                              dp_size=1) -> torch.Tensor:
    """SPEC's ``policy_loss_from_logits`` for PPO, one 0-d float64 tensor per token (autograd gives the gradient):
    ``z = logits / T``, ``logp = z_id - lse``, ``H = lse - sum p z``, the clipped surrogate (GSPO at
    ``level="sequence"``), ``agg(l) - entropy_coef * agg(H)``, times ``dp_size``."""
    B, T, V = logits.shape
    m = mask.tolist()
    logp, ent = {}, {}
    for i in range(B):
        for t in range(T):
            if not m[i][t]:
                continue
            z = [logits[i, t, v] / temperature for v in range(V)]
            top = max(float(x.detach()) for x in z)
            s = sum(torch.exp(x - top) for x in z)
            lse = top + torch.log(s)
            logp[i, t] = z[int(ids[i, t])] - lse
            ent[i, t] = lse - sum(torch.exp(x - lse) * x for x in z)
    zero = torch.zeros((), dtype=torch.float64)
    surrogate = {}
    for (i, t), lp in logp.items():
        if level == "sequence":
            row = [(i, u) for u in range(T) if m[i][u]]
            mean = sum(float(logp[k].detach()) - float(old[k]) for k in row) / len(row)
            d = lp - lp.detach() + mean
        else:
            d = lp - float(old[i, t])
        r = torch.exp(torch.clamp(d, -20.0, 20.0))
        a = float(adv[i])
        clipped = torch.clamp(r, 1 - eps_low, 1 + eps_high)
        surrogate[i, t] = -torch.minimum(r * a, clipped * a)

    def aggregate(per_token: dict) -> torch.Tensor:
        n = [sum(m[i]) for i in range(B)]
        n_seq = B if num_seqs is None else num_seqs
        total = sum(per_token.values(), zero)
        if aggregation == "token_mean":
            return total / (sum(n) if num_tokens is None else num_tokens)
        if aggregation == "seq_mean_token_mean":
            return sum((sum(per_token[i, t] for t in range(T) if m[i][t]) / n[i] for i in range(B) if n[i]),
                       zero) / n_seq
        if aggregation == "seq_mean_token_sum":
            return total / n_seq
        if aggregation == "constant":
            return total / (n_seq * max_tokens)
        return total  # token_sum

    return (aggregate(surrogate) - entropy_coef * aggregate(ent)) * dp_size


ENTROPY_BONUS_CASES = [
    dict(aggregation="token_mean", num_tokens=23, dp_size=3),
    dict(aggregation="seq_mean_token_mean", num_seqs=5, dp_size=3),
    dict(aggregation="seq_mean_token_sum", dp_size=2),
    dict(aggregation="constant", max_tokens=6, num_seqs=4, dp_size=3),
    dict(aggregation="token_sum", dp_size=2),
    dict(aggregation="token_mean", dp_size=3, level="sequence"),  # a row statistic: the general path
]


def _entropy_bonus_problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    old = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0] + 0.4 * torch.randn(B, T, generator=gen,
                                                                                                 dtype=torch.float64)
    old = old.clamp(max=-1e-3)  # a log-probability
    adv = torch.tensor([1.2, -0.7, 0.5], dtype=torch.float64)
    return logits, ids, old, adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(ENTROPY_BONUS_CASES)))
def test_entropy_bonus_with_counts_and_dp_size_matches_a_float64_loop(backend, case):
    """``policy_loss_from_logits`` with an entropy bonus under ``dp_size > 1`` and global counts: loss and logits'
    gradient against the float64 loop (the bonus aggregated with the loss's normaliser and multiplied by
    ``dp_size`` like it)."""
    options = dict(ENTROPY_BONUS_CASES[case])
    logits, ids, old, adv, mask = _entropy_bonus_problem(30 + case)
    kw = {"temperature": 0.8, "entropy_coef": 0.3, "eps_low": 0.2, "eps_high": 0.28, "level": "token", **options}
    x64 = logits.clone().requires_grad_(True)
    want = _oracle_loss_with_entropy(x64, ids, old, adv, mask, **kw)
    (want_grad,) = torch.autograd.grad(want, x64)
    x = logits.float().to(DEVICE).requires_grad_(True)
    got = rlloss.policy_loss_from_logits(x, ids.to(DEVICE), old.float().to(DEVICE), adv.float().to(DEVICE),
                                         mask.to(DEVICE), backend=backend, **kw)
    (grad,) = torch.autograd.grad(got.loss, x)
    torch.testing.assert_close(got.loss.detach().double().cpu(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.double().cpu(), want_grad, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [0, 1, 3, 5])
def test_entropy_bonus_from_hidden_with_counts_and_dp_size_matches_a_float64_loop(backend, case):
    """The same from hidden states and an LM head with a bias (the fused loss path forms the bonus's gradient
    with the aggregation's per-token weight; GSPO takes the general path): loss and every gradient."""
    options = dict(ENTROPY_BONUS_CASES[case])
    _, ids, old, adv, mask = _entropy_bonus_problem(40 + case)
    gen = torch.Generator().manual_seed(41 + case)
    hidden = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(7, generator=gen, dtype=torch.float64)
    kw = {"temperature": 0.8, "entropy_coef": 0.3, "eps_low": 0.2, "eps_high": 0.28, "level": "token", **options}
    leaves64 = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    want = _oracle_loss_with_entropy(leaves64[0] @ leaves64[1].T + leaves64[2], ids, old, adv, mask, **kw)
    want_grads = torch.autograd.grad(want, leaves64)
    leaves = [x.float().to(DEVICE).requires_grad_(True) for x in (hidden, weight, bias)]
    got = rlloss.policy_loss_from_hidden(leaves[0], leaves[1], ids.to(DEVICE), old.float().to(DEVICE),
                                         adv.float().to(DEVICE), mask.to(DEVICE), bias=leaves[2], backend=backend,
                                         max_tile_bytes=4 * 7 * 4, **kw)  # tiles of 4 tokens: 4 chunks
    grads = torch.autograd.grad(got.loss, leaves)
    torch.testing.assert_close(got.loss.detach().double().cpu(), want.detach(), rtol=2e-5, atol=1e-6)
    for name, g, w in zip(("hidden", "weight", "bias"), grads, want_grads):
        torch.testing.assert_close(g.double().cpu(), w, rtol=2e-5, atol=1e-5, msg=name)
