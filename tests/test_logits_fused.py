"""The Triton path from logits: entropy against fp64 at large logits, the id check, and masked
positions that are never read.

Equivalence with the reference over drawn shapes is in ``tests/test_logits.py``; launches and bytes
in ``tests/test_traffic.py``.
"""

from __future__ import annotations

import pytest
import torch

import rlloss

# entropy of the Triton path against an fp64 computation on the same fp32 logits
ENTROPY_RTOL, ENTROPY_ATOL = 1e-5, 1e-6


def _fp64_reference(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, ids[..., None])[..., 0], -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("center", [1e4, -1e4, 0.0])
@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_entropy_matches_fp64_even_for_logits_near_1e4(center, scale):
    gen = torch.Generator().manual_seed(int(scale * 10) + (center > 0))
    logits = center + scale * torch.randn(3, 5, 3000, generator=gen)
    logits[0, 0, 17] += 40.0  # a peaked row: p > 1 - 1e-6
    ids = torch.randint(0, 3000, (3, 5), generator=gen)
    logp, entropy = rlloss.token_logprobs(logits, ids, return_entropy=True, backend="triton")
    logp64, entropy64 = _fp64_reference(logits, ids)
    err = (entropy.double() - entropy64).abs()
    assert bool((err <= ENTROPY_ATOL + ENTROPY_RTOL * entropy64.abs()).all()), f"max error {float(err.max()):.3g}"
    assert bool((entropy >= 0).all())
    assert bool((logp <= 0).all())
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-6, atol=2e-6)


def test_entropy_mean_of_the_fused_loss_matches_fp64_near_1e4():
    gen = torch.Generator().manual_seed(3)
    logits = -1e4 + torch.randn(2, 6, 1000, generator=gen)
    ids = torch.randint(0, 1000, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend="triton")
    _, entropy64 = _fp64_reference(logits, ids)
    expected = entropy64.mean()
    assert abs(float(out.metrics["entropy_mean"]) - float(expected)) <= ENTROPY_ATOL + ENTROPY_RTOL * float(expected)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("bad", [11, -1, -100])
def test_an_id_outside_the_vocabulary_at_a_valid_position_raises(backend, bad):
    # a ValueError naming ids on the CPU (on CUDA a device-side assert, no sync), never a NaN loss; the same
    # id where masked is never read
    logits = torch.randn(2, 3, 11)
    ids = torch.randint(0, 11, (2, 3))
    ids[1, 2] = bad
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 11\)"):
        rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend=backend)
    mask[1, 2] = False
    out = rlloss.policy_loss_from_logits(logits, ids, None, torch.ones(2), mask, backend=backend)
    assert torch.isfinite(out.loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel's device assert stops these ids, as "
                    "test_an_id_outside_the_vocabulary_at_a_valid_position_raises expects there")
@pytest.mark.parametrize("block", [4, 1024])
def test_the_id_check_kernel_counts_exactly_the_ids_outside_the_vocabulary(block):
    """The kernel behind the GPU's device assert: count, least and greatest of the valid ids outside [0, V),
    against numpy, with V itself (the off-by-one that reads past a row), -1, and huge ids at masked positions
    (never counted); strided ids and several blocks. On the CPU the ValueError above comes from the host's
    check, so this is the test that reads the kernel's own result."""
    from rlloss.kernels.logits import _ids_in_vocab_kernel
    from rlloss.kernels._common import as_bytes

    V = 11
    ids = torch.tensor([[0, V, 3, -1, V - 1, 7, V + 3], [2, 10**6, V, 5, -7, 1, 0]])
    wide = torch.zeros(2, 14, dtype=torch.int64)
    wide[:, ::2] = ids  # a time stride of 2
    ids = wide[:, ::2]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 0, 1, 1]], dtype=torch.bool)
    x, m = ids.numpy(), mask.numpy()
    bad = x[m & ((x < 0) | (x >= V))]
    assert sorted(bad.tolist()) == [-1, V, V, V + 3]  # 10**6 and -7 are masked
    out = torch.full((3,), -5, dtype=torch.int64)
    mb = as_bytes(mask)
    _ids_in_vocab_kernel[(1,)](ids, mb, out, ids.numel(), ids.shape[1], V, ids.stride(0), ids.stride(1),
                               mb.stride(0), mb.stride(1), BLOCK=block)
    assert out.tolist() == [bad.size, bad.min(), bad.max()]
    out = torch.full((3,), -5, dtype=torch.int64)
    clean = torch.where(mask, ids.clamp(0, V - 1), ids)
    _ids_in_vocab_kernel[(1,)](clean, mb, out, ids.numel(), ids.shape[1], V, clean.stride(0), clean.stride(1),
                               mb.stride(0), mb.stride(1), BLOCK=block)
    assert out[0].item() == 0


@pytest.mark.parametrize("inplace", [False, True])
def test_masked_positions_are_never_read(inplace):
    """NaN logits and an id of -100 at masked positions change nothing, the gradient there is 0."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 19, generator=gen)
    ids = torch.randint(0, 19, (3, 4), generator=gen)
    mask = torch.rand(3, 4, generator=gen) > 0.4
    mask[0] = False
    old, adv = -torch.rand(3, 4, generator=gen), torch.randn(3, generator=gen)
    poisoned = torch.where(mask[..., None], logits, torch.full_like(logits, float("nan")))
    results = []
    for x, i in ((logits, ids), (poisoned, torch.where(mask, ids, torch.full_like(ids, -100)))):
        leaf = x.clone().requires_grad_(True)
        y = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf buffer nothing else reads
        out = rlloss.policy_loss_from_logits(y, i, old, adv, mask, entropy_coef=0.05, beta=0.0,
                                             inplace_backward=inplace, backend="triton")
        out.loss.backward()
        results.append((out.loss.detach(), out.metrics["entropy_mean"], leaf.grad))
    (l0, h0, g0), (l1, h1, g1) = results
    assert torch.equal(l0, l1) and torch.equal(h0, h1)
    assert torch.equal(g0, g1)
    assert bool((g1[~mask] == 0).all())


# V = 3 * 4096 + 5: three full vocabulary chunks of MAX_BLOCK_V and a partial fourth. Row k holds its largest
# logit in chunk k, so the running max grows at chunk k and the sums of the chunks before are moved onto it
# (at V = 4097 the maximum is almost never the one logit of the second chunk).
CHUNKED_V = 3 * 4096 + 5
PEAK_COLUMNS = (17, 4096 + 1000, 2 * 4096 + 4095, 3 * 4096 + 4)  # one in each chunk, the last one partial


def _peak_in_each_chunk(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, 4, V]`` logits whose row k peaks (by +9) in chunk k, and ids."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(1, len(PEAK_COLUMNS), CHUNKED_V, generator=gen)
    for row, col in enumerate(PEAK_COLUMNS):
        logits[0, row, col] = logits[0, row].max() + 9.0
    ids = torch.tensor([[PEAK_COLUMNS[0], 5, PEAK_COLUMNS[2], CHUNKED_V - 1]])
    return logits, ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_and_its_gradient_when_the_maximum_is_in_a_later_chunk(temperature):
    """Logp, entropy and d(entropy + logp)/d logits of the Triton path against fp64 ``log_softmax`` for rows whose
    maximum lies in vocabulary chunk 0, 1, 2 and the partial chunk 3."""
    from rlloss.kernels.logits import MAX_BLOCK_V

    assert CHUNKED_V > 3 * MAX_BLOCK_V  # the chunks this test is about
    logits, ids = _peak_in_each_chunk(21)
    for r, col in enumerate(PEAK_COLUMNS):
        assert int(logits[0, r].argmax()) // MAX_BLOCK_V == r  # row r's maximum in chunk r
    leaf = logits.clone().requires_grad_(True)
    logp, entropy = rlloss.token_logprobs(leaf, ids, temperature=temperature, return_entropy=True, backend="triton")
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), leaf)
    x64 = logits.double().requires_grad_(True)
    lsm = torch.log_softmax(x64 / temperature, -1)
    logp64, entropy64 = lsm.gather(-1, ids[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1)
    (grad64,) = torch.autograd.grad(logp64.sum() + entropy64.sum(), x64)
    torch.testing.assert_close(entropy.double(), entropy64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), logp64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-5)  # |z| up to 20: p rounds to 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_path_entropy_when_the_maximum_is_in_a_later_chunk(temperature):
    """The same rows from hidden states and an LM head with a bias (its tile epilogue runs the same chunked
    statistics with the bias added): logp and entropy against fp64 on the same logits."""
    logits, ids = _peak_in_each_chunk(22)
    # logits = hidden @ weight.T + bias with hidden = e_r (one-hot rows): weight's columns carry the logits
    n = len(PEAK_COLUMNS)
    hidden = torch.eye(n)
    bias = 0.5 * torch.randn(CHUNKED_V, generator=torch.Generator().manual_seed(23))
    weight = (logits[0] - bias).T.contiguous()  # [V, n]
    logp, entropy = rlloss.linear_token_logprobs(hidden, weight, ids[0], bias=bias, temperature=temperature,
                                                 return_entropy=True, backend="triton")
    z = (hidden.double() @ weight.double().T + bias.double()) / temperature
    lsm = torch.log_softmax(z, -1)
    torch.testing.assert_close(entropy.double(), -(lsm.exp() * lsm).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), lsm.gather(-1, ids[0][:, None])[:, 0], rtol=1e-5, atol=1e-5)
