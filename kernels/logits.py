"""Token log-probs and entropy from ``[B, T, V]`` logits, streaming the vocabulary in chunks.

Mirrors ``rlloss.logits._token_logprobs_torch`` without materialising ``[B, T, V]`` probabilities:

* ``_logits_fwd_kernel``: one program per token position reads its row of logits once, keeping a
  running max, the running sum of ``exp(z - max)`` and, for the entropy, of ``exp(z - max) * z``
  (both rescaled when the max grows). It writes ``logp``, the entropy and the logsumexp.
* ``_logits_bwd_kernel``: one program per position reads the row again and writes
  ``d/dz = g_logp * (onehot - p) - g_H * p * (z - E_p[z])``, divided by the temperature, into a new
  tensor or, with ``inplace_backward``, into the logits buffer itself (each chunk is read before it
  is overwritten, and programs own disjoint rows).

So the logits are read twice and the gradient written once: the least a backward through a
softmax can move. Everything is fp32 inside; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_bytes

MAX_BLOCK_V = 4096


def block_v(v: int) -> tuple[int, int]:
    """(vocabulary chunk, warps) for a vocabulary of ``v`` tokens."""
    bv = min(MAX_BLOCK_V, triton.next_power_of_2(max(v, 16)))
    return bv, 8 if bv >= 2048 else 4


@triton.jit
def row_softmax_stats(row_ptr, b_ptr, n_vocab, V, temperature, RETURN_ENTROPY: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """``(m, s, sz)`` of one row of logits ``z = (row + bias) / temperature``: its max ``m`` (0 if every
    logit is -inf), ``s = sum exp(z - m)`` and, with ``RETURN_ENTROPY``, ``sz = sum exp(z - m) (z - m)``,
    online over the first ``n_vocab`` columns (0: an empty row, ``s = 0``).

    The entropy sum is taken against the running max ``m`` (and moved when ``m`` grows), so
    ``H = log s - sz / s`` adds terms of size ``log V`` however large the logits: summing ``p * z``
    would subtract two numbers of the size of the logits (1e4) and lose 1e-4 of H.
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)  # sum of exp(z - m) * (z - m)
    for v0 in range(0, n_vocab, BLOCK_V):
        offs = v0 + cols
        keep = offs < V
        x = tl.load(row_ptr + offs, mask=keep, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        z = x / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: nothing to shift by
        rescale = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)  # 0 outside the vocabulary (z = -inf)
        if RETURN_ENTROPY:
            # old terms move from (z - m) to (z - m_new): add (m - m_new) times their weight
            shift = (tl.where(m == float("-inf"), m_ref, m) - m_ref) * s  # 0 before the first finite max
            sz = (sz + shift) * rescale + tl.sum(tl.where(e > 0, e * (z - m_ref), 0.0), axis=0)  # 0, not 0 * -inf
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    return tl.where(m == float("-inf"), 0.0, m), s, sz


@triton.jit
def _logits_fwd_kernel(
    logits_ptr, ids_ptr, mask_ptr, logp_ptr, ent_ptr, lse_ptr,
    T, V, s_b, s_t, s_ids_b, s_ids_t, s_m_b, s_m_t, temperature,
    RETURN_ENTROPY: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per position: ``row_softmax_stats`` of its logits, then ``logp = (z_id - m) - log s``
    (nearby numbers first, never against a rounded logsumexp), the entropy and the logsumexp. A
    masked position reads nothing and writes 0; an id outside ``[0, V)`` at a read position gives
    NaN (the range check, in the kernel, without a sync) and no read out of bounds.
    """
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = logits_ptr + b * s_b + t * s_t
    valid = tl.full((), 1, tl.int1)
    if HAS_MASK:
        valid = tl.load(mask_ptr + b * s_m_b + t * s_m_t) != 0
    n_vocab = tl.where(valid, V, 0)  # a masked position loops over nothing
    m_ref, s, sz = row_softmax_stats(row, row, n_vocab, V, temperature, RETURN_ENTROPY, False, BLOCK_V)
    log_s = tl.log(s)
    token = tl.load(ids_ptr + b * s_ids_b + t * s_ids_t, mask=valid, other=0)
    in_vocab = (token >= 0) & (token < V)
    z_token = tl.load(row + tl.where(in_vocab, token, 0), mask=valid).to(tl.float32) / temperature
    logp = tl.where(in_vocab, (z_token - m_ref) - log_s, float("nan"))
    tl.store(logp_ptr + r, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + r, tl.where(valid, m_ref + log_s, 0.0))
    if RETURN_ENTROPY:
        tl.store(ent_ptr + r, tl.where(valid, log_s - sz / s, 0.0))


@triton.jit
def _logits_bwd_kernel(
    logits_ptr, ids_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, grad_ptr,
    T, V, s_b, s_t, s_ids_b, s_ids_t, g_s_b, g_s_t, temperature,
    mask_ptr, s_m_b, s_m_t, scale_ptr, row_scale_ptr, grad_out_ptr, entropy_coef, b_ptr,
    HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, FROM_LOSS: tl.constexpr = False,
    HAS_MASK: tl.constexpr = False, HAS_BIAS: tl.constexpr = False, ALIASED: tl.constexpr = False,
):
    """``d/dz = g_logp * (onehot - p) - g_H * p * (z - E_p[z])``, over the temperature, with
    ``z = (logits + bias) / temperature`` (``HAS_BIAS``: the LM head's bias, from hidden states).

    ``FROM_LOSS`` (``policy_loss_from_logits``): the upstream gradients come straight from the
    fused loss, ``g_logp = grad_out * factor * row_factor[b] * g[b, t]`` (``g`` the stored d loss /
    d logp) and ``g_H = -entropy_coef * grad_out * factor * row_factor[b]``, 0 at masked positions
    (whose logits are not read and whose gradient is written 0). ``HAS_MASK`` (not ``FROM_LOSS``)
    masks positions the same way, with the gradients given per position.

    ``ALIASED``: ``grad`` is a narrower dtype written into the first half of each fp32 row of
    ``logits`` (the tile of ``kernels.linear_logprobs``). A block's stores then land on columns that
    other warps of the program may still be reading, so a barrier separates each block's loads
    from its stores; blocks go left to right, so nothing is overwritten before it is read.
    """
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = logits_ptr + b * s_b + t * s_t
    out = grad_ptr + b * g_s_b + t * g_s_t
    lse = tl.load(lse_ptr + r)
    valid = tl.full((), 1, tl.int1)
    if FROM_LOSS:
        valid = tl.load(mask_ptr + b * s_m_b + t * s_m_t) != 0
        scale = tl.load(grad_out_ptr).to(tl.float32) * tl.load(scale_ptr) * tl.load(row_scale_ptr + b)
        g_logp = tl.where(valid, scale * tl.load(g_logp_ptr + r).to(tl.float32), 0.0)
        g_ent = tl.where(valid, -entropy_coef * scale, 0.0)
    else:
        if HAS_MASK:
            valid = tl.load(mask_ptr + b * s_m_b + t * s_m_t) != 0
        g_logp = tl.load(g_logp_ptr + r).to(tl.float32)
        if HAS_ENTROPY_GRAD:
            g_ent = tl.load(g_ent_ptr + r).to(tl.float32)
    token = tl.load(ids_ptr + b * s_ids_b + t * s_ids_t, mask=valid, other=-1)
    if HAS_ENTROPY_GRAD:
        mean_z = lse - tl.load(ent_ptr + r)  # E_p[z] = logsumexp - H
    n_read = tl.where(valid, V, 0)  # a masked position's logits are not read (its gradient is written 0)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        keep = offs < V
        x = tl.load(row + offs, mask=offs < n_read, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + offs, mask=offs < n_read, other=0.0).to(tl.float32)
        z = x / temperature
        p = tl.exp(z - lse)
        dz = g_logp * (tl.where(offs == token, 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            dz -= tl.where(p > 0, g_ent * p * (z - mean_z), 0.0)
        dz = tl.where(valid, dz, 0.0)
        if ALIASED:  # every warp's loads of this block done before any store into the row
            tl.debug_barrier()
        tl.store(out + offs, (dz / temperature).to(grad_ptr.dtype.element_ty), mask=keep)


IDS_CHECK_BLOCK = 1024
ID_NONE = 2**62  # the min and max of no bad id


@triton.jit(debug=True)  # debug: tl.device_assert is compiled in (this kernel alone)
def _ids_in_vocab_kernel(
    ids_ptr, mask_ptr, out_ptr, n, T, V, s_ids_b, s_ids_t, s_m_b, s_m_t,
    BLOCK: tl.constexpr,
):
    """One program over the ``[B, T]`` ids: how many at valid positions lie outside ``[0, V)``, and the
    least and the greatest of them, into ``out[0:3]``; on a GPU a device-side assert when any does."""
    count = tl.zeros((), tl.int64)
    lo = tl.full((), ID_NONE_, tl.int64)
    hi = tl.full((), -ID_NONE_, tl.int64)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        inside = offs < n
        b, t = offs // T, offs % T
        valid = inside & (tl.load(mask_ptr + b * s_m_b + t * s_m_t, mask=inside, other=0) != 0)
        x = tl.load(ids_ptr + b * s_ids_b + t * s_ids_t, mask=valid, other=0).to(tl.int64)
        bad = valid & ((x < 0) | (x >= V))
        count += tl.sum(bad.to(tl.int64), axis=0)
        lo = tl.minimum(lo, tl.min(tl.where(bad, x, ID_NONE_), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(bad, x, -ID_NONE_), axis=0))
    tl.store(out_ptr, count)
    tl.store(out_ptr + 1, lo)
    tl.store(out_ptr + 2, hi)
    tl.device_assert(count == 0, "rlloss: ids outside the vocabulary of logits where mask is True")


ID_NONE_: tl.constexpr = tl.constexpr(ID_NONE)


def check_ids_in_vocab(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    """Ids read as tokens (``mask`` True) must index the vocabulary: one launch, no host sync on a GPU
    (a device-side assert, surfacing at the next sync). Triton's interpreter (CPU tensors) compiles no
    device assert: there the same check is made on the host, from the ids themselves, with numpy (the
    stand-in for the assert, not a step of the GPU's sequence: no launch, no torch op), as the
    ``ValueError`` of the reference's."""
    B, T = ids.shape
    out = torch.empty(3, dtype=torch.int64, device=ids.device)
    m = as_bytes(mask)
    _ids_in_vocab_kernel[(1,)](ids, m, out, B * T, max(T, 1), vocab, ids.stride(0), ids.stride(1), m.stride(0),
                               m.stride(1), BLOCK=IDS_CHECK_BLOCK)
    if ids.device.type == "cpu":
        x = ids.numpy()
        bad = x[(m.numpy() != 0) & ((x < 0) | (x >= vocab))]
        if bad.size:
            raise ValueError(f"ids must be in [0, {vocab}) (the vocabulary of logits), got values in "
                             f"[{bad.min()}, {bad.max()}] at {bad.size} valid position(s); padding ids (such as "
                             "-100) are never tokens: mask them out (mask= False there) so they are not read")


def vocab_contiguous(logits: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch and time strides, but a unit vocabulary stride."""
    return logits if logits.stride(2) == 1 else logits.contiguous()


def token_logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float, return_entropy: bool,
                           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)``, fp32 ``[B, T]`` each (0 where ``mask`` is False); ``entropy`` is
    empty without ``return_entropy``."""
    B, T, V = logits.shape
    x = vocab_contiguous(logits)
    dev = logits.device
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    lse = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T) if return_entropy else (0,), dtype=torch.float32, device=dev)
    bv, warps = block_v(V)
    if B * T:
        m = ids if mask is None else as_bytes(mask)
        _logits_fwd_kernel[(B * T,)](
            x, ids, m, logp, entropy if return_entropy else lse, lse, T, V, x.stride(0), x.stride(1), ids.stride(0),
            ids.stride(1), m.stride(0), m.stride(1), float(temperature), RETURN_ENTROPY=return_entropy,
            HAS_MASK=mask is not None, BLOCK_V=bv, num_warps=warps,
        )
    return logp, entropy, lse


def token_logprobs_backward(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                            g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None, temperature: float,
                            grad: torch.Tensor) -> None:
    """Write ``d / d logits`` into ``grad`` (``[B, T, V]``; it may be ``logits`` itself: each chunk is
    read before it is overwritten, and programs own disjoint rows)."""
    x = vocab_contiguous(logits)
    B, T, V = x.shape
    if g_logp is None:
        g_logp = torch.zeros((B, T), dtype=torch.float32, device=x.device)
    has_ent_grad = g_entropy is not None and entropy.numel() > 0
    bv, warps = block_v(V)
    if B * T:
        _logits_bwd_kernel[(B * T,)](
            x, ids, lse, entropy if has_ent_grad else lse, g_logp.contiguous(),
            g_entropy.contiguous() if has_ent_grad else lse, grad,
            T, V, x.stride(0), x.stride(1), ids.stride(0), ids.stride(1), grad.stride(0), grad.stride(1),
            float(temperature), ids, 0, 0, lse, lse, lse, 0.0, lse,
            HAS_ENTROPY_GRAD=has_ent_grad, BLOCK_V=bv, num_warps=warps,
        )


def policy_loss_from_logits_backward(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, lse: torch.Tensor,
                                     entropy: torch.Tensor, g: torch.Tensor, grad_loss: torch.Tensor,
                                     factor: torch.Tensor, row_factor: torch.Tensor, temperature: float,
                                     entropy_coef: float, grad: torch.Tensor) -> None:
    """Write ``d loss / d logits`` of the fused from-logits loss into ``grad`` (may be ``logits``): one launch."""
    x = vocab_contiguous(logits)
    B, T, V = x.shape
    m = as_bytes(mask)
    bv, warps = block_v(V)
    if B * T:
        _logits_bwd_kernel[(B * T,)](
            x, ids, lse, entropy, g, lse, grad,
            T, V, x.stride(0), x.stride(1), ids.stride(0), ids.stride(1), grad.stride(0), grad.stride(1),
            float(temperature), m, m.stride(0), m.stride(1), factor, row_factor, grad_loss, float(entropy_coef), lse,
            HAS_ENTROPY_GRAD=entropy_coef != 0, BLOCK_V=bv, FROM_LOSS=True, num_warps=warps,
        )
