"""The loss from hidden states and the LM head: both backends against ``token_logprobs`` on materialised logits.

The expected values never come from the code under test: they are ``token_logprobs`` (reference
backend) on logits built here in fp32 from the same inputs, and autograd through that.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import rlloss
from helpers import BACKENDS, DEVICE, assert_close, gloo_rank, spawn_ranks, triton_runs_here
from strategies import make_mask

needs_triton = pytest.mark.skipif(not triton_runs_here(), reason="needs triton with a CUDA device or TRITON_INTERPRET=1")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# V below one vocabulary block (128), at its edges, and several blocks; H below and above one block (64)
VOCABS = st.one_of(st.integers(1, 40), st.sampled_from([127, 128, 129, 301, 523]))
HIDDENS = st.one_of(st.integers(1, 40), st.sampled_from([63, 65, 97]))
TOKENS = st.one_of(st.integers(1, 20), st.sampled_from([63, 64, 65, 150]))
GRADS = ("logp", "entropy", "both")


def make_head(n: int, h: int, v: int, dtype: torch.dtype, seed: int, *, bias: bool, mask_kind: str = "full",
              logit_shift: float = 0.0, peak: float = 0.0, strided: bool = False):
    """hidden [1, n, h], weight [v, h], bias, ids [1, n] (-100 and NaN hidden where masked), mask."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / math.sqrt(h) * 2
    b = torch.randn(v, generator=gen) + logit_shift if bias or logit_shift else None
    ids = torch.randint(0, v, (1, n), generator=gen)
    if peak:  # the target token dominates: p > 1 - 1e-6
        b = torch.zeros(v) if b is None else b
        b[0] += peak
        ids[:] = 0
    mask = make_mask(mask_kind, 1, n, gen)
    hidden[~mask] = float("nan")  # masked positions never matter
    ids[~mask] = -100
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = b.to(dtype) if b is not None else None
    if strided:  # non-contiguous layouts, as slices of bigger buffers and a transposed head
        big = torch.zeros(1, n, 2 * h, dtype=dtype)
        big[..., ::2] = hidden
        hidden = big[..., ::2]
        weight = weight.T.contiguous().T
    put = (lambda x: x.to(DEVICE) if x is not None else None)
    return put(hidden), put(weight), put(b), ids.to(DEVICE), mask.to(DEVICE)


def upstream(n: int, which: str, seed: int, strided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    g = torch.randn(2, 1, 2 * n, generator=gen).to(DEVICE)
    gl, ge = (g[0, :, ::2], g[1, :, ::2]) if strided else (g[0, :, :n].contiguous(), g[1, :, :n].contiguous())
    if which == "logp":
        ge = torch.zeros_like(ge)
    if which == "entropy":
        gl = torch.zeros_like(gl)
    return gl, ge


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) if x is not None else None for x in xs]


def grads_of(out: torch.Tensor, xs) -> list[torch.Tensor | None]:
    present = [x for x in xs if x is not None]
    got = iter(torch.autograd.grad(out, present))
    return [next(got) if x is not None else None for x in xs]


def expected(hidden, weight, bias, ids, mask, temperature, gl, ge):
    """token_logprobs on fp32 logits materialised here; gradients by autograd, rounded to the inputs' dtype."""
    h, w, b = leaves(torch.where(mask[..., None], hidden.float(), 0.0), weight.float(),
                     bias.float() if bias is not None else None)
    logits = h @ w.T + (b if b is not None else 0.0)
    logp, ent = rlloss.token_logprobs(logits, torch.where(mask, ids, 0), temperature=temperature,
                                      return_entropy=True, backend="torch")
    logp, ent = torch.where(mask, logp, 0.0), torch.where(mask, ent, 0.0)
    *grads, d_logits = grads_of((logp * gl).sum() + (ent * ge).sum(), [h, w, b, logits])
    z_scale = float(logits.detach().abs().max()) / temperature + 1.0 if logits.numel() else 1.0
    # rounding of a reordered sum is relative to the sum of magnitudes, |d logits| @ |weight| etc., and
    # p = exp(z - lse) carries the rounding of z, relative to |z|
    dl = d_logits.abs()[0] * z_scale
    scales = (dl @ w.detach().abs(), dl.T @ h.detach().abs()[0], dl.sum(0) if b is not None else None)
    return logp.detach(), ent.detach(), grads, z_scale, scales


# the entropy differentiated; returned differentiable but unused (backward gets no entropy gradient);
# returned detached (entropy_grad=False); not returned
ENTROPY_KINDS = ("grad", "unused", "metric", "none")


def run(hidden, weight, bias, ids, mask, temperature, gl, ge, backend, entropy="grad", max_tile_bytes=None):
    """Outputs and gradients. ``entropy="metric"`` (``entropy_grad=False``) and ``"none"`` (no entropy
    returned) leave the log-prob the only gradient (``ent`` is None for ``"none"``)."""
    h, w, b = leaves(hidden, weight, bias)
    out = rlloss.linear_token_logprobs(h, w, ids, bias=b, temperature=temperature, mask=mask,
                                       return_entropy=entropy != "none", entropy_grad=entropy in ("grad", "unused"),
                                       max_tile_bytes=max_tile_bytes, backend=backend)
    logp, ent = out if entropy != "none" else (out, None)
    assert ent is None or ent.requires_grad == (entropy in ("grad", "unused"))
    grads = grads_of((logp * gl).sum() + ((ent * ge).sum() if entropy == "grad" else 0), [h, w, b])
    return logp.detach(), None if ent is None else ent.detach(), grads


def check_against_logits(hidden, weight, bias, ids, mask, temperature, gl, ge, backend, entropy="grad",
                         max_tile_bytes=None):
    dtype = hidden.dtype
    if entropy != "grad":
        ge = torch.zeros_like(ge)
    want_logp, want_ent, want_grads, z_scale, scales = expected(hidden, weight, bias, ids, mask, temperature, gl, ge)
    logp, ent, grads = run(hidden, weight, bias, ids, mask, temperature, gl, ge, backend, entropy, max_tile_bytes)
    assert_close(logp, want_logp, torch.float32, scale=z_scale, what="logp")
    if ent is not None:
        assert_close(ent, want_ent, torch.float32, scale=z_scale, what="entropy")
        assert bool((ent[~mask] == 0).all())
    assert bool((logp <= 0).all()), "a log-probability above 0"
    assert bool((logp[~mask] == 0).all())
    for name, got, want, scale in zip(("hidden", "weight", "bias"), grads, want_grads, scales):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype, f"d {name} in {got.dtype}, not the input's {dtype}"
        assert_close(got, want.to(dtype).reshape(got.shape), dtype, scale=scale.reshape(got.shape),
                     what=f"d {name}")
    assert bool((grads[0][~mask] == 0).all()), "gradient at masked positions"


@given(n=TOKENS, h=HIDDENS, v=VOCABS, dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.7, 1.3]),
       bias=st.booleans(), mask_kind=st.sampled_from(["random", "full", "prefix", "all_masked"]),
       which=st.sampled_from(GRADS), strided=st.booleans(), seed=st.integers(0, 2**31 - 1),
       backend=st.sampled_from(BACKENDS), tile=st.sampled_from([None, 7, 64]))
@example(n=1, h=1, v=1, dtype=torch.float32, temperature=1.0, bias=False, mask_kind="full", which="both",
         strided=False, seed=0, backend=BACKENDS[-1], tile=None)
@example(n=65, h=65, v=301, dtype=torch.bfloat16, temperature=0.7, bias=True, mask_kind="random", which="both",
         strided=True, seed=1, backend=BACKENDS[-1], tile=7)  # non-contiguous inputs and upstream gradients
@example(n=150, h=63, v=523, dtype=torch.float16, temperature=1.3, bias=False, mask_kind="prefix",
         which="entropy", strided=False, seed=2, backend=BACKENDS[-1], tile=64)
@example(n=20, h=9, v=129, dtype=torch.bfloat16, temperature=0.7, bias=True, mask_kind="random", which="logp",
         strided=False, seed=3, backend=BACKENDS[-1], tile=1)  # one token per tile, the entropy a metric
# the log-prob-only gradient (no entropy term in the epilogue) at temperatures != 1, with a bias, in tiles of 7
# and 6 tokens with a partial last one and padding in every tile: the entropy returned as a metric (seed % 3 == 1)
# and not returned (seed % 3 == 2)
@example(n=20, h=9, v=129, dtype=torch.float32, temperature=0.7, bias=True, mask_kind="random", which="logp",
         strided=False, seed=4, backend=BACKENDS[-1], tile=7)
@example(n=20, h=17, v=131, dtype=torch.bfloat16, temperature=1.3, bias=True, mask_kind="prefix", which="logp",
         strided=False, seed=5, backend=BACKENDS[-1], tile=6)
# the entropy's gradient alone and both, at a temperature, with a bias, several tiles
@example(n=23, h=9, v=129, dtype=torch.float32, temperature=1.3, bias=True, mask_kind="random", which="entropy",
         strided=False, seed=6, backend=BACKENDS[-1], tile=5)
@example(n=20, h=9, v=129, dtype=torch.float32, temperature=0.7, bias=True, mask_kind="random", which="both",
         strided=False, seed=7, backend="torch", tile=None)  # the reference, the same options
def test_matches_token_logprobs_on_materialised_logits(n, h, v, dtype, temperature, bias, mask_kind, which, strided,
                                                       seed, backend, tile):
    hidden, weight, b, ids, mask = make_head(n, h, v, dtype, seed, bias=bias, mask_kind=mask_kind, strided=strided)
    gl, ge = upstream(n, which, seed, strided)
    # a log-prob gradient alone: the entropy returned unused, as a metric, or not returned
    entropy = "grad" if which != "logp" else ENTROPY_KINDS[1 + seed % 3]
    # tiles of ``tile`` tokens (None: the default, one tile here): chunk boundaries anywhere in the tokens
    check_against_logits(hidden, weight, b, ids, mask, temperature, gl, ge, backend, entropy,
                         None if tile is None else 4 * v * tile)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_very_negative_logits_give_correct_never_positive_logp(backend, dtype):
    # verl's max started at 0: rows whose logits are all about -1e4 came out with positive log-probs
    hidden, weight, b, ids, mask = make_head(37, 33, 301, dtype, 3, bias=True, logit_shift=-1e4)
    gl, ge = upstream(37, "both", 3, False)
    check_against_logits(hidden, weight, b, ids, mask, 1.0, gl, ge, backend)
    for entropy in ENTROPY_KINDS[1:]:
        check_against_logits(hidden, weight, b, ids, mask, 1.0, gl, ge, backend, entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_rows(backend):
    # p > 1 - 1e-6 at the target: logp is about -1e-7, never positive, d logits = g (1 - p) not rounded away
    hidden, weight, b, ids, mask = make_head(9, 17, 129, torch.float32, 4, bias=False, peak=30.0)
    gl, ge = upstream(9, "both", 4, False)
    logp = rlloss.linear_token_logprobs(hidden, weight, ids, bias=b, backend=backend)
    assert bool((torch.exp(logp) > 1 - 1e-6).all()) and bool((logp <= 0).all())
    check_against_logits(hidden, weight, b, ids, mask, 1.0, gl, ge, backend)
    for entropy in ENTROPY_KINDS[1:]:
        check_against_logits(hidden, weight, b, ids, mask, 1.0, gl, ge, backend, entropy)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_is_bitwise_deterministic(dtype):
    hidden, weight, b, ids, mask = make_head(150, 65, 301, dtype, 5, bias=True, mask_kind="random")
    gl, ge = upstream(150, "both", 5, False)
    for entropy in ENTROPY_KINDS:
        first = run(hidden, weight, b, ids, mask, 0.8, gl, ge, "triton", entropy)
        second = run(hidden, weight, b, ids, mask, 0.8, gl, ge, "triton", entropy)
        assert torch.equal(first[0], second[0])
        assert entropy == "none" or torch.equal(first[1], second[1])
        for a, c in zip(first[2], second[2]):
            assert torch.equal(a, c)


def test_float64_gradcheck_of_the_reference():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3), generator=gen)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    ids[~mask] = -100
    assert torch.autograd.gradcheck(
        lambda h, w, b: rlloss.linear_token_logprobs(h, w, ids, bias=b, temperature=0.7, mask=mask,
                                                     return_entropy=True, backend="torch"),
        (hidden, weight, bias))


def loss_inputs(dtype: torch.dtype, seed: int, *, bias: bool = True):
    hidden, weight, b, ids, mask = make_head(23, 19, 131, dtype, seed, bias=bias, mask_kind="random")
    hidden = hidden.reshape(1, 23, 19).expand(2, 23, 19).clone()
    hidden[1] = hidden[1].flip(0)
    ids = torch.cat([ids, ids.flip(1)])
    mask = torch.cat([mask, mask.flip(1)])
    mask[1] = False  # an empty row
    ids[1] = -100
    gen = torch.Generator().manual_seed(seed)
    old = (-torch.rand(2, 23, generator=gen) * 5).to(DEVICE)
    adv = torch.randn(2, generator=gen).to(DEVICE)
    return hidden, weight, b, ids, mask, old, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [
    {},
    {"aggregation": "seq_mean_token_mean", "entropy_coef": 0.01, "temperature": 0.7, "beta": 0.04},
    {"aggregation": "constant", "max_tokens": 32, "level": "sequence", "entropy_coef": 0.1},
    {"objective": "cispo", "num_tokens": 40, "dp_size": 2, "entropy_coef": 0.05},
])
def test_policy_loss_from_hidden_is_policy_loss_from_logits(backend, options):
    hidden, weight, b, ids, mask, old, adv = loss_inputs(torch.float32, 6)
    kw = dict(options)
    if "beta" in kw:
        kw["ref_logp"] = old + 0.1
    h, w, bb = leaves(hidden, weight, b)
    out = rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, bias=bb, backend=backend, **kw)
    grads = grads_of(out.loss, [h, w, bb])
    h2, w2, b2 = leaves(torch.where(mask[..., None], hidden, 0.0), weight, b)
    want = rlloss.policy_loss_from_logits(h2 @ w2.T + b2, ids, old, adv, mask, backend="torch", **kw)
    want_grads = grads_of(want.loss, [h2, w2, b2])
    assert_close(out.loss, want.loss, torch.float32, scale=1.0, what="loss")
    assert set(out.metrics) == set(want.metrics) and "entropy_mean" in out.metrics
    for name in want.metrics:
        assert_close(out.metrics[name], want.metrics[name], torch.float32, scale=1.0, what=name)
    for name, got, exp in zip(("hidden", "weight", "bias"), grads, want_grads):
        assert_close(got, exp, torch.float32, scale=float(exp.abs().max()), what=f"d {name}")


# the loss path (token-local objectives: the gradient formed in the forward) and the general path (row
# statistics first: GSPO, VESPO, GMPO, sequence-level bias correction), each option of the loss
LOSS_OPTIONS = [
    {},
    {"eps_high": 0.28, "dual_clip": 3.0, "delta": 2.5, "aggregation": "token_sum"},
    {"objective": "sapo", "aggregation": "seq_mean_token_sum", "num_seqs": 5},
    {"objective": "reinforce", "kl": "k2", "beta": 0.1, "aggregation": "constant", "max_tokens": 16},
    {"objective": "dppo_kl", "kl": "abs+", "beta": 0.05, "kl_bias_correction": True},
    {"objective": rlloss.DRO(beta=0.3), "token_weights": "row", "num_tokens": 33.0, "dp_size": 3},
    {"objective": "cispo", "token_weights": "token", "adv": "token"},
    {"level": "sequence", "beta": 0.04, "kl_bias_correction": True},  # GSPO, general path
    {"objective": "vespo"},
    {"objective": "gmpo", "aggregation": "seq_mean_token_mean", "token_weights": "token"},
]


def _loss_kwargs(options: dict, old, adv, mask, seed: int) -> tuple[dict, torch.Tensor]:
    """Options with their tensors made: ``ref_logp`` when ``beta`` is set, ``token_weights`` per row or
    token, per-token advantages."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(options)
    if kw.get("beta"):
        kw["ref_logp"] = old + 0.3 * torch.randn(old.shape, generator=gen).to(DEVICE)
    if kw.get("token_weights") == "row":
        kw["token_weights"] = torch.rand(old.shape[0], generator=gen).to(DEVICE)
    elif kw.get("token_weights") == "token":
        kw["token_weights"] = torch.rand(old.shape, generator=gen).to(DEVICE)
    if kw.pop("adv", None) == "token":
        adv = adv[:, None] * torch.rand(old.shape, generator=gen).to(DEVICE)
    return kw, adv


@given(options=st.sampled_from(LOSS_OPTIONS), dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([1.0, 0.7]),
       bias=st.booleans(), entropy_coef=st.sampled_from([0.0, 0.02]), tile=st.sampled_from([None, 5, 16]),
       on_policy=st.booleans(), seed=st.integers(0, 2**31 - 1))
@example(options=LOSS_OPTIONS[0], dtype=torch.bfloat16, temperature=0.7, bias=True, entropy_coef=0.02, tile=5,
         on_policy=False, seed=0)  # DAPO's loss at a temperature, three tiles (the loss path's arithmetic)
@example(options=LOSS_OPTIONS[4], dtype=torch.float32, temperature=0.7, bias=False, entropy_coef=0.0, tile=1,
         on_policy=False, seed=1)
@example(options=LOSS_OPTIONS[7], dtype=torch.float16, temperature=1.0, bias=True, entropy_coef=0.02, tile=16,
         on_policy=True, seed=2)
# dp_size and a global token count with the entropy bonus, a temperature, a bias, tiles of 16 (the last partial)
@example(options=LOSS_OPTIONS[5], dtype=torch.float32, temperature=1.3, bias=True, entropy_coef=0.02, tile=16,
         on_policy=False, seed=3)
# a global row count, the entropy bonus at a temperature, tiles of 5
@example(options=LOSS_OPTIONS[2], dtype=torch.bfloat16, temperature=0.7, bias=False, entropy_coef=0.02, tile=5,
         on_policy=False, seed=4)
# the general path (a row statistic) at a temperature, with a bias, the bonus and tiles
@example(options=LOSS_OPTIONS[8], dtype=torch.float32, temperature=0.7, bias=True, entropy_coef=0.02, tile=16,
         on_policy=False, seed=5)
def test_policy_loss_from_hidden_matches_the_loss_on_materialised_logits(options, dtype, temperature, bias,
                                                                         entropy_coef, tile, on_policy, seed):
    """Every objective, aggregation, KL and weight option, dtype, temperature, bias and tile height, with an
    empty row and NaN hidden states at masked positions: ``policy_loss_from_logits`` (reference) on fp32
    logits built here, loss, metrics and gradients."""
    hidden, weight, b, ids, mask, old, adv = loss_inputs(dtype, seed, bias=bias)
    kw, adv = _loss_kwargs(options, old, adv, mask, seed)
    old_in = None if on_policy else old
    backend = BACKENDS[-1]
    h, w, bb = leaves(hidden, weight, b)
    out = rlloss.policy_loss_from_hidden(h, w, ids, old_in, adv, mask, bias=bb, temperature=temperature,
                                         entropy_coef=entropy_coef, backend=backend,
                                         max_tile_bytes=None if tile is None else 4 * weight.shape[0] * tile, **kw)
    grads = grads_of(out.loss * 1.5, [h, w, bb])  # an upstream gradient other than 1
    h2, w2, b2 = leaves(torch.where(mask[..., None], hidden, 0.0).float(), weight.float(),
                        None if b is None else b.float())
    logits = h2 @ w2.T + (b2 if b2 is not None else 0.0)
    want = rlloss.policy_loss_from_logits(logits, ids, old_in, adv, mask, temperature=temperature,
                                          entropy_coef=entropy_coef, backend="torch", **kw)
    want_grads = grads_of(want.loss * 1.5, [h2, w2, b2])
    assert_close(out.loss, want.loss, torch.float32, scale=1.0, what="loss")
    assert set(out.metrics) == set(want.metrics) and "entropy_mean" in out.metrics
    for name in want.metrics:
        assert_close(out.metrics[name], want.metrics[name], torch.float32, scale=1.0, what=name)
    for name, got, exp, x in zip(("hidden", "weight", "bias"), grads, want_grads, (hidden, weight, b)):
        if exp is None:
            assert got is None
            continue
        assert got.dtype == x.dtype
        assert_close(got.float(), exp, x.dtype if x.dtype != torch.float32 else torch.float32,
                     scale=float(exp.abs().max()), what=f"d {name}")
    assert bool((grads[0][~mask] == 0).all()), "gradient at masked positions"


@needs_triton
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bounds", [(0, 60, 131), (0, 40, 90, 131)], ids=["2 shards", "3 shards"])
def test_combine_shards_gives_the_whole_vocabulary_statistics(bounds, temperature):
    """The vocabulary-parallel arithmetic without processes: each shard's tile statistics (with its slice of the
    bias), rebased on the global maximum by ``combine_shards`` and summed, give fp64's logp, entropy and logsumexp
    of the whole vocabulary. Shard maxima differ by row (one row peaks in each shard)."""
    from rlloss.kernels.linear_logprobs import combine_shards, finish_stats, tile_stats

    gen = torch.Generator().manual_seed(19)
    C, V = 6, bounds[-1]
    logits = 2 * torch.randn(C, V, generator=gen)
    for row in range(C):  # row r peaks inside shard r % shards
        lo, hi = bounds[row % (len(bounds) - 1)], bounds[row % (len(bounds) - 1) + 1]
        logits[row, lo + (hi - lo) // 2] += 8.0
    bias = torch.randn(V, generator=gen)
    ids = torch.randint(0, V, (C,), generator=gen)
    ok = torch.ones(C, dtype=torch.bool)
    ok[4] = False  # padding: read nowhere
    stats = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        local = torch.where((ids >= lo) & (ids < hi), ids - lo, torch.full_like(ids, -1))
        stats.append(tile_stats(logits[:, lo:hi].contiguous(), bias[lo:hi].contiguous(), local, ok, temperature))
    big_m = torch.stack([m for m, *_ in stats]).amax(0)
    parts = sum(combine_shards(*st, big_m) for st in stats)
    logp, entropy, lse = finish_stats(big_m, parts[0], parts[1], parts[2])
    z = (logits.double() + bias.double()) / temperature
    lsm = torch.log_softmax(z, -1)
    want_logp = lsm.gather(-1, ids[:, None])[:, 0]
    want_ent = -(lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(logp[ok].double(), want_logp[ok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[ok].double(), want_ent[ok], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[ok].double(), torch.logsumexp(z, -1)[ok], rtol=1e-6, atol=1e-5)


def test_bias_and_temperature_are_applied_as_the_spec_says():
    # V=2, one token, hidden·weight = (0, 1), bias (0, ln 3 - 1) -> logits (0, ln 3), temperature 1: p = (1/4, 3/4)
    hidden = torch.tensor([[1.0]], device=DEVICE)
    weight = torch.tensor([[0.0], [1.0]], device=DEVICE)
    bias = torch.tensor([0.0, math.log(3.0) - 1.0], device=DEVICE)
    for backend in BACKENDS:
        logp, ent = rlloss.linear_token_logprobs(hidden, weight, torch.tensor([1], device=DEVICE), bias=bias,
                                                 return_entropy=True, backend=backend)
        assert logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
        assert ent.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
        half = rlloss.linear_token_logprobs(hidden, weight, torch.tensor([1], device=DEVICE), bias=bias,
                                            temperature=2.0, backend=backend)  # logits (0, ln 3) / 2
        assert half.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w[:, :3], i), ValueError, "weight"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i[:, :2]), ValueError, "ids"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h[0, 0], w, i), ValueError, "hidden"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h.long(), w, i), TypeError, "hidden"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w.double(), i), TypeError, "weight"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i.float()), TypeError, "ids"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w.to("meta"), i), ValueError, "weight on meta"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i, bias=torch.zeros(3)), ValueError, "bias"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i, temperature=0.0), ValueError, "temperature"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i, return_entropy=True, entropy_grad=None), TypeError,
         "entropy_grad"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i + 100), ValueError, "ids"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i - 100), ValueError, "ids"),
        (lambda h, w, i: rlloss.linear_token_logprobs(h, w, i, mask=torch.ones(2, 2, dtype=torch.bool)),
         ValueError, "mask"),
        (lambda h, w, i: rlloss.policy_loss_from_hidden(h, w, i, None, torch.ones(2), torch.ones(2, 3),
                                                        entropy_coef=-1.0), ValueError, "entropy_coef"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(call, error, words, backend):
    if DEVICE.type != "cpu":
        pytest.skip("the eager ValueError on out-of-range ids is the CPU path; CUDA asserts on the device")
    hidden, weight, _, ids, _ = make_head(3, 5, 11, torch.float32, 0, bias=False)
    hidden = hidden.expand(2, 3, 5).clone()
    ids = ids.expand(2, 3).clone()
    with pytest.raises(error, match=words):
        call(hidden, weight, ids)


def test_out_of_range_ids_where_masked_are_never_read():
    hidden, weight, _, ids, _ = make_head(4, 5, 11, torch.float32, 0, bias=False)
    mask = torch.tensor([[True, False, True, False]], device=DEVICE)
    ids[~mask] = 10**9
    for backend in BACKENDS:
        logp = rlloss.linear_token_logprobs(hidden, weight, ids, mask=mask, backend=backend)
        assert bool((logp[~mask] == 0).all()) and bool(torch.isfinite(logp).all())


# --- custom ops: their opcheck cases are in tests/test_ops.py, with every other rlloss:: op's ------------


@needs_triton
@pytest.mark.parametrize("call", ["logprobs", "logprobs:metric", "loss"])
def test_compiles_with_fullgraph(call, monkeypatch):
    # each whole call one opaque op: nothing breaks the graph, the same values and gradients as eager
    hidden, weight, b, ids, mask = make_head(20, 9, 40, torch.float32, 9, bias=True, mask_kind="random")
    old, adv = -torch.rand(1, 20).to(DEVICE) * 2, torch.ones(1, device=DEVICE)

    def f(h, w, bb):
        if call == "loss":
            return rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, bias=bb, entropy_coef=0.1,
                                                  max_tile_bytes=4 * 40 * 7, backend="triton").loss
        logp, ent = rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, return_entropy=True,
                                                 entropy_grad=call == "logprobs", backend="triton")
        return (logp * 2).sum() + ent.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    launches = _Launches(monkeypatch)
    h, w, bb = leaves(hidden, weight, b)
    got = compiled(h, w, bb)
    g = torch.autograd.grad(got, [h, w, bb])
    want_steps = (["logits", "stats", "grad", "d hidden", "d weight"] * 3 if call == "loss"
                  else ["logits", "stats", "logits", "grad", "d hidden", "d weight"])
    assert launches.seen == want_steps
    h2, w2, b2 = leaves(hidden, weight, b)
    want = f(h2, w2, b2)
    assert torch.equal(got.detach(), want.detach())
    for a, c in zip(g, torch.autograd.grad(want, [h2, w2, b2])):
        assert torch.equal(a, c)


# --- vocabulary parallelism on gloo ----------------------------------------------------------------------

N_TP, H_TP, V_TP = 29, 21, 301  # 301 = 151 + 150 = 101 + 100 + 100: uneven shards


def tp_problem():
    hidden, weight, b, ids, mask = make_head(N_TP, H_TP, V_TP, torch.float32, 11, bias=True, mask_kind="random")
    gen = torch.Generator().manual_seed(12)
    gl, ge = torch.randn(1, N_TP, generator=gen), torch.randn(1, N_TP, generator=gen)
    old, adv = -torch.rand(1, N_TP, generator=gen) * 4, torch.randn(1, generator=gen)
    return hidden, weight, b, ids, mask, gl, ge, old, adv


TP_TILE_BYTES = 4 * 151 * 5  # 5 tokens per tile over shards of 151 and 150 rows, 7 over 101 and 100


def _tp_rank(rank: int, port: int, out_dir: str, world: int, names: list[str]) -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    torch.set_num_threads(1)
    with gloo_rank(rank, port, out_dir, world):
        hidden, weight, b, ids, mask, gl, ge, old, adv = tp_problem()
        rows = torch.tensor_split(torch.arange(V_TP), world)[rank]
        out = {}
        patch = pytest.MonkeyPatch()
        launches = _Launches(patch) if triton_runs_here() else None

        def call(h, w, bb, backend, what):
            group = torch.distributed.group.WORLD
            if what.startswith("loss"):
                tile = TP_TILE_BYTES if what == "loss-tiles" else None
                loss = rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, bias=bb, temperature=0.8,
                                                      entropy_coef=0.05, group=group, max_tile_bytes=tile,
                                                      backend=backend, eps_high=0.28).loss
                return loss, loss
            return rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, temperature=0.8, return_entropy=True,
                                                entropy_grad=what == "grad", group=group, backend=backend)

        compiled = torch.compile(call, backend="inductor", fullgraph=True)
        for name in names:
            backend, how, what = _tp_case(name)
            h, w, bb = leaves(hidden, weight[rows], b[rows])
            if how == "compile":  # the loop over chunks is traced there: the spies' list would be a side effect
                patch.undo()
                launches = None
            if launches is not None:
                launches.seen.clear()
            x, y = (compiled if how == "compile" else call)(h, w, bb, backend, what)
            loss = x if what.startswith("loss") else (x * gl).sum() + ((y * ge).sum() if what == "grad" else 0)
            grads = torch.autograd.grad(loss, [h, w, bb])
            out[name] = (x.detach(), y.detach(), *grads, list(launches.seen) if launches is not None else None)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")


def _tp_case(name: str) -> tuple[str, str, str]:
    """``"triton+compile:metric"`` -> (backend, "eager" | "compile", "grad" | "metric" | "loss" | "loss-tiles")."""
    rest, what = (name.split(":") + ["grad"])[:2]
    backend, how = (rest.split("+") + ["eager"])[:2]
    return backend, how, what


@pytest.mark.parametrize("world", [2, 3])
def test_vocabulary_parallel_equals_the_unsharded_call(world, tmp_path):
    # each backend eagerly and inside torch.compile (a trainer compiles its step; the collectives must not
    # break it): the log-probs with the entropy differentiated and as a metric, and the loss path (the
    # shards' statistics combined per chunk before the gradient epilogue), in one tile and in several
    names = [f"{backend}:{what}" for backend in BACKENDS for what in ("grad", "metric", "loss", "loss-tiles")]
    # compiled (after the eager ones, which count the steps): each path once per backend, the loss path in
    # several tiles (inductor's C++ build of each graph is most of this test's time)
    names += [f"{backend}+compile:{what}" for backend in BACKENDS for what in ("grad", "loss-tiles")]
    results = spawn_ranks(_tp_rank, world, tmp_path, 600.0, world, names)
    hidden, weight, b, ids, mask, gl, ge, old, adv = tp_problem()
    for name in names:
        backend, _, what = _tp_case(name)
        if what.startswith("loss"):
            h2, w2, b2 = leaves(torch.where(mask[..., None], hidden, 0.0), weight, b)
            want = rlloss.policy_loss_from_logits(h2 @ w2.T + b2, ids, old, adv, mask, temperature=0.8,
                                                  entropy_coef=0.05, eps_high=0.28, backend="torch").loss
            want_grads = grads_of(want, [h2, w2, b2])
            scales = [float(g.abs().max()) for g in want_grads]
            for r, res in enumerate(results):
                loss, _, dh, _, _, seen = res[name]
                assert_close(loss, want.detach(), torch.float32, scale=1.0, what=f"{name} rank {r} loss")
                assert_close(dh, want_grads[0], torch.float32, scale=scales[0], what=f"{name} rank {r} d hidden")
                if backend == "triton" and seen is not None:
                    chunks = -(-N_TP // (5 if world == 2 else 7)) if what == "loss-tiles" else 1
                    assert seen == (FWD + GRADS) * chunks, f"{name} rank {r}: {seen}"
        else:
            g_ent = ge if what == "grad" else torch.zeros_like(ge)
            want_logp, want_ent, want_grads, z_scale, scales = expected(hidden, weight, b, ids, mask, 0.8, gl, g_ent)
            for r, res in enumerate(results):
                logp, ent, dh, _, _, seen = res[name]
                assert_close(logp, want_logp, torch.float32, scale=z_scale, what=f"{name} rank {r} logp")
                assert_close(ent, want_ent, torch.float32, scale=z_scale, what=f"{name} rank {r} entropy")
                assert_close(dh, want_grads[0], torch.float32, scale=scales[0][None],
                             what=f"{name} rank {r} d hidden")
                if backend == "triton" and seen is not None:
                    assert seen == FWD + ["logits"] + GRADS, f"{name} rank {r}: {seen}"
            scales = scales[1:]
            want_grads = want_grads[1:]
        if what.startswith("loss"):
            want_grads, scales = want_grads[1:], scales[1:]
        dw = torch.cat([res[name][3] for res in results])
        db = torch.cat([res[name][4] for res in results])
        assert_close(dw, want_grads[0], torch.float32, scale=scales[0], what=f"{name} d weight")
        assert_close(db, want_grads[1], torch.float32, scale=scales[1], what=f"{name} d bias")


# --- the benchmark's contenders ----------------------------------------------------------------------------


def test_benchmark_contenders_compute_the_same_values_and_gradients():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_hidden

    hidden, weight, ids, gl, ge = bench_hidden.make_inputs(40, 300, 24)
    hidden, weight = hidden.float(), weight.float()  # the contenders' own arithmetic, not bf16 rounding, is compared
    names = [n for n in bench_hidden.CONTENDERS if n not in bench_hidden.FUSED or triton_runs_here()]
    names = [n for n in names if n != "trl-1.16" or _trl_imports()]
    assert "rlloss-fused-loss" in names or not triton_runs_here()
    for name in names:
        # the loss path's loss has the log-prob contenders' gradient with no entropy term
        g_ent = torch.zeros_like(ge) if name in bench_hidden.LOSS else ge
        want = bench_hidden.step(bench_hidden.build("rlloss-torch"), hidden, weight, ids, gl, g_ent)
        got = bench_hidden.step(bench_hidden.build(name), hidden, weight, ids, gl, g_ent)
        for what, a, e in zip(("logp", "entropy", "d hidden", "d weight"), got, want):
            if a is None:  # the loss path returns no log-probs
                assert name in bench_hidden.LOSS
                continue
            assert_close(a, e, torch.float32, scale=float(e.abs().max()) + 1.0, what=f"{name} {what}")


def _trl_imports() -> bool:
    try:
        from trl.kernels import ChunkedLogProbFunction  # noqa: F401
    except Exception:
        return False
    return True


@needs_triton
@pytest.mark.parametrize("function", ["linear_token_logprobs", "policy_loss_from_hidden"])
def test_extra_memory_is_one_tile_and_the_weight_accumulator(function, monkeypatch):
    """The issue's bound, counted on the CPU allocator: N = 2048, V = 16384, H = 64, ``max_tile_bytes=8 MiB``:
    the peak beyond inputs, outputs and gradients of forward + backward stays under 16 MiB, an eighth of
    one ``[N, V]`` fp32 buffer (128 MiB), so nothing of size ``N * V`` is ever held.

    The two tile epilogues are replaced by no-ops: kernels allocate nothing (the glue around them does,
    with shapes that never depend on values: no sync, no boolean indexing), and Triton's interpreter
    would take minutes over 2048 rows of 16384 logits. The values are then meaningless; the memory is not.
    """
    import sys

    from rlloss.kernels import linear_logprobs

    if DEVICE.type != "cpu":
        pytest.skip("counted with the CPU allocator's profiler (the CUDA benchmark measures the GPU)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness import cpu_peak_bytes

    class NoOp:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for kernel in ("_tile_stats_kernel", "_logits_bwd_kernel"):
        monkeypatch.setattr(linear_logprobs, kernel, NoOp())
    n, v, h_dim = 2048, 16384, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, n // 2, h_dim, generator=gen)
    weight = torch.randn(v, h_dim, generator=gen) / 8
    ids = torch.randint(0, v, (2, n // 2), generator=gen)
    mask = torch.ones(2, n // 2, dtype=torch.bool)
    old, adv = -torch.rand(2, n // 2, generator=gen) * 5, torch.randn(2, generator=gen)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)

    def step():
        if function == "policy_loss_from_hidden":
            loss = rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, max_tile_bytes=8 * 2**20,
                                                  backend="triton").loss
        else:
            loss = rlloss.linear_token_logprobs(h, w, ids, mask=mask, max_tile_bytes=8 * 2**20, backend="triton").sum()
        return torch.autograd.grad(loss, [h, w])

    peak = cpu_peak_bytes(step)
    gradients, outputs = 4 * (n * h_dim + v * h_dim), 4 * n
    extra = peak - gradients - outputs
    assert extra < 16 * 2**20, f"{function}: {extra / 2**20:.1f} MiB beyond inputs, outputs and gradients"
    assert extra >= 8 * 2**20  # the tile itself is counted: the meter sees the allocations


@pytest.mark.parametrize("backend", BACKENDS)
def test_hugging_face_hidden_states_and_lm_head_give_the_loss_of_its_logits(backend):
    """The README's usage: ``outputs.hidden_states[-1][:, P-1:-1]`` and ``model.lm_head.weight`` give the
    loss and the parameter gradients that ``policy_loss_from_logits`` gives on the model's own logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(DEVICE)
    B, P, T = 3, 4, 6
    seq = torch.randint(0, 97, (B, P + T), device=DEVICE)
    mask = torch.arange(T, device=DEVICE)[None, :] < torch.tensor([[6], [2], [4]], device=DEVICE)
    old = -torch.rand(B, T, device=DEVICE) * 5
    adv = torch.randn(B, device=DEVICE)
    kw = {"eps_high": 0.28, "aggregation": "seq_mean_token_mean", "entropy_coef": 0.01, "temperature": 0.9}
    params = [model.lm_head.weight, model.model.layers[1].mlp.down_proj.weight]

    out = model(input_ids=seq, output_hidden_states=True, logits_to_keep=1)  # no [B, P + T, V] logits
    got = rlloss.policy_loss_from_hidden(out.hidden_states[-1][:, P - 1:-1], model.lm_head.weight, seq[:, P:],
                                         old, adv, mask, backend=backend, **kw)
    got_grads = torch.autograd.grad(got.loss, params)
    logits = model(input_ids=seq).logits[:, P - 1:-1]
    want = rlloss.policy_loss_from_logits(logits, seq[:, P:], old, adv, mask, backend="torch", **kw)
    want_grads = torch.autograd.grad(want.loss, params)
    assert_close(got.loss, want.loss, torch.float32, scale=1.0, what="loss")
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, torch.float32, scale=float(w.abs().max()), what="parameter gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_entropy_near_1e4_matches_float64(backend, shift):
    """Logits exactly representable in fp32 (hidden 1, weight k/8, bias +-1e4): the entropy is summed
    against the running max, so it stays within 1e-5 relative of fp64; ``lse - sum p z`` would lose
    about 2e-4 there."""
    gen = torch.Generator().manual_seed(13)
    v = 301
    weight = (torch.randint(-40, 41, (v, 1), generator=gen).float() / 8).to(DEVICE)
    bias = torch.full((v,), shift, device=DEVICE)
    hidden = torch.ones(5, 1, device=DEVICE) * torch.tensor([1.0, 0.5, 2.0, 0.25, 1.5], device=DEVICE)[:, None]
    ids = torch.randint(0, v, (5,), generator=gen).to(DEVICE)
    logp, ent = rlloss.linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, backend=backend)
    z = hidden.double() @ weight.double().T + shift
    lsm = torch.log_softmax(z, -1)
    want_ent = -(lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logp.double(), lsm.gather(-1, ids[:, None])[:, 0], rtol=1e-5, atol=1e-6)


@needs_triton
def test_without_entropy_the_gradient_is_the_log_prob_gradient():
    hidden, weight, b, ids, mask = make_head(33, 17, 131, torch.float32, 14, bias=True, mask_kind="random")
    gl, _ = upstream(33, "logp", 14, False)
    zero = torch.zeros_like(gl)
    want = run(hidden, weight, b, ids, mask, 1.0, gl, zero, "torch")[2]
    h, w, bb = leaves(hidden, weight, b)
    logp = rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, backend="triton")
    got = torch.autograd.grad((logp * gl).sum(), [h, w, bb])
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32, scale=float(e.abs().max()))


# --- which steps run: the matmuls over the head and the tile epilogues ------------------------------------------


class _Launches:
    """Records the steps of ``kernels.linear_logprobs.run_chunks`` while installed in place of them: the three
    matmuls over the head (``logits``, ``d hidden``, ``d weight``) and the two row epilogues (``stats``, ``grad``)."""

    STEPS = {"logits_product": "logits", "_tile_stats_kernel": "stats", "_logits_bwd_kernel": "grad",
             "hidden_product": "d hidden", "add_weight_product": "d weight"}

    def __init__(self, monkeypatch):
        from rlloss.kernels import linear_logprobs

        self.seen: list[str] = []
        for name, step in self.STEPS.items():
            monkeypatch.setattr(linear_logprobs, name, self._spy(getattr(linear_logprobs, name), step))

    def _spy(self, fn, step):
        seen = self.seen
        if not hasattr(fn, "run"):  # a Python function
            def call(*args, **kwargs):
                seen.append(step)
                return fn(*args, **kwargs)
            return call

        class Kernel:  # a Triton kernel, launched as kernel[grid](...)
            def __getitem__(self, grid):
                seen.append(step)
                return fn[grid]
        return Kernel()


FWD, GRADS = ["logits", "stats"], ["grad", "d hidden", "d weight"]


@needs_triton
@pytest.mark.parametrize("case, want", [
    ("logp", FWD + ["logits"] + GRADS),
    ("entropy metric", FWD + ["logits"] + GRADS),
    ("entropy grad", FWD + ["logits"] + GRADS),
    ("no_grad", FWD),
    ("frozen head", FWD + ["logits", "grad", "d hidden"]),
    ("frozen hidden", FWD + ["logits", "grad", "d weight"]),
    ("loss", FWD + GRADS),  # the loss path: 3 matmuls
    ("loss, entropy bonus", FWD + GRADS),
    ("loss, frozen head", FWD + ["grad", "d hidden"]),
    ("loss, no_grad", FWD),
    ("loss, 3 tiles", (FWD + GRADS) * 3),
    ("loss, GSPO", FWD + ["logits"] + GRADS),  # a row statistic first: the general path, 4 matmuls
])
def test_each_call_runs_the_steps_it_needs_and_the_gradients_it_asks_for(monkeypatch, case, want):
    # what is frozen costs no matmul; a token-local loss computes its logits once; the values and gradients
    # are the reference's either way
    hidden, weight, b, ids, mask = make_head(40, 17, 301, torch.float32, 16, bias=False, mask_kind="random")
    gen = torch.Generator().manual_seed(16)
    old, adv = torch.randn(1, 40, generator=gen) - 2, torch.randn(1, generator=gen)

    def call(backend):
        h = hidden.clone().requires_grad_(not case.endswith("frozen hidden"))
        w = weight.clone().requires_grad_(not case.endswith("frozen head"))
        leaves = [x for x in (h, w) if x.requires_grad]
        if case.startswith("loss"):
            kw = dict(entropy_coef=0.1 if "bonus" in case else 0.0, level="sequence" if "GSPO" in case else "token",
                      max_tile_bytes=4 * 301 * 14 if "3 tiles" in case else None)
            if case.endswith("no_grad"):
                with torch.no_grad():
                    return [rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, backend=backend, **kw).loss]
            out = rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, backend=backend, **kw)
            return [out.loss.detach(), *torch.autograd.grad(out.loss, leaves)]
        if case == "no_grad":
            with torch.no_grad():
                return [rlloss.linear_token_logprobs(h, w, ids, mask=mask, backend=backend)]
        kind = {"entropy metric": "metric", "entropy grad": "grad"}.get(case)
        out = rlloss.linear_token_logprobs(h, w, ids, mask=mask, return_entropy=kind is not None,
                                           entropy_grad=kind == "grad", backend=backend)
        logp, ent = out if kind else (out, None)
        loss = (logp * 1.5).sum() + (ent.sum() if case == "entropy grad" else 0)
        return [logp.detach(), *torch.autograd.grad(loss, leaves)]

    want_values = call("torch")
    launches = _Launches(monkeypatch)
    got = call("triton")
    assert launches.seen == want, f"{case}: ran {launches.seen}"
    for a, e in zip(got, want_values, strict=True):
        assert_close(a, e, torch.float32, scale=float(e.abs().max()) + 1.0, what=case)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_probs_are_bitwise_the_same_whether_or_not_a_gradient_follows(dtype):
    # the old and reference log-probs come from no-grad calls, the training call forms its gradient: the same
    # tiles (the same height from the same N), the same sums, so an on-policy ratio is exactly 1
    hidden, weight, b, ids, mask = make_head(70, 33, 1031, dtype, 17, bias=True, mask_kind="random")
    with torch.no_grad():
        plain, plain_ent = rlloss.linear_token_logprobs(hidden, weight, ids, bias=b, mask=mask, return_entropy=True,
                                                        backend="triton")
    for entropy_grad in (False, True):
        h, w, bb = leaves(hidden, weight, b)
        logp, ent = rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, return_entropy=True,
                                                 entropy_grad=entropy_grad, backend="triton")
        assert torch.equal(logp.detach(), plain) and torch.equal(ent.detach(), plain_ent)
    h, w, bb = leaves(hidden, weight, b)
    adv = torch.tensor([1.0], device=DEVICE)
    out = rlloss.policy_loss_from_hidden(h, w, ids, plain, adv, mask, bias=bb, backend="triton")
    assert out.metrics["ratio_mean"].item() == 1.0 and out.metrics["clip_low"].item() == 0.0
    assert out.metrics["entropy_mean"].item() == pytest.approx(float(plain_ent[mask].double().mean()), rel=1e-6)


@needs_triton
def test_a_frozen_weight_with_a_trainable_bias_gets_only_the_bias_gradient():
    hidden, weight, b, ids, mask = make_head(40, 17, 301, torch.bfloat16, 18, bias=True, mask_kind="random")
    gl, _ = upstream(40, "logp", 18, False)
    grads = {}
    for backend in ("torch", "triton"):
        h, bb = hidden.clone().requires_grad_(True), b.clone().requires_grad_(True)
        w = weight.clone()  # frozen
        logp = rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, backend=backend)
        (logp * gl).sum().backward()
        assert w.grad is None and h.grad.dtype == hidden.dtype and bb.grad.dtype == b.dtype
        grads[backend] = (h.grad.float(), bb.grad.float())
    for what, got, want in zip(("d hidden", "d bias"), grads["triton"], grads["torch"]):
        assert_close(got, want, torch.bfloat16, scale=float(want.abs().max()) + 1.0, what=what)


@needs_triton
@pytest.mark.parametrize("function", ["linear_token_logprobs", "policy_loss_from_hidden", "gspo"])
def test_no_host_sync_in_either_path(function, monkeypatch):
    """Forward + backward of the loss path and of the general path, counted on the interpreter's aten ops:
    no ``.item()`` (``_local_scalar_dense``), no ``nonzero`` or ``masked_select`` (what boolean indexing
    runs), whatever the mask; several tiles. The id check is left out: on CPU tensors it reads the ids
    on the host by design (its ValueError), on a GPU it asserts on the device (``check_ids_in_vocab``;
    its own tests). On a GPU, ``python benchmarks/bench_hidden.py`` runs each path under
    ``torch.cuda.set_sync_debug_mode("error")``."""
    import sys

    import rlloss.hidden

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import traffic

    monkeypatch.setattr(rlloss.hidden, "check_ids_in_vocab", lambda *args, **kwargs: None)

    hidden, weight, b, ids, mask = make_head(40, 17, 301, torch.float32, 19, bias=True, mask_kind="random")
    old, adv = -torch.rand(1, 40).to(DEVICE) * 3, torch.ones(1, device=DEVICE)
    h, w, bb = leaves(hidden, weight, b)

    def step():
        if function == "linear_token_logprobs":
            logp, ent = rlloss.linear_token_logprobs(h, w, ids, bias=bb, mask=mask, return_entropy=True,
                                                     max_tile_bytes=4 * 301 * 16, backend="triton")
            loss = (logp * 2).sum() + ent.sum()
        else:
            level = "sequence" if function == "gspo" else "token"  # GSPO: the general path under the loss
            loss = rlloss.policy_loss_from_hidden(h, w, ids, old, adv, mask, bias=bb, entropy_coef=0.1,
                                                  max_tile_bytes=4 * 301 * 16, level=level, backend="triton").loss
        torch.autograd.grad(loss, [h, w, bb])

    step()
    counts = traffic.count_triton(step)
    names = [launch.name for launch in counts.launches]
    assert counts.syncs == 0, names
    assert not [n for n in names if "nonzero" in n or "masked_select" in n], names
