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

MAX_BLOCK_V = 4096


def block_v(v: int) -> tuple[int, int]:
    """(vocabulary chunk, warps) for a vocabulary of ``v`` tokens."""
    bv = min(MAX_BLOCK_V, triton.next_power_of_2(max(v, 16)))
    return bv, 8 if bv >= 2048 else 4


@triton.jit
def _logits_fwd_kernel(
    logits_ptr, ids_ptr, logp_ptr, ent_ptr, lse_ptr,
    T, V, s_b, s_t, s_ids_b, s_ids_t, temperature,
    RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = logits_ptr + b * s_b + t * s_t
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    sz = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        keep = offs < V
        z = tl.load(row + offs, mask=keep, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)  # 0 outside the vocabulary (z = -inf)
        s = s * rescale + tl.sum(e, axis=0)
        if RETURN_ENTROPY:
            sz = sz * rescale + tl.sum(tl.where(e > 0, e * z, 0.0), axis=0)  # 0, not 0 * -inf, where p = 0
        m = m_new
    lse = m + tl.log(s)
    token = tl.load(ids_ptr + b * s_ids_b + t * s_ids_t)
    z_token = tl.load(row + token).to(tl.float32) / temperature
    tl.store(logp_ptr + r, z_token - lse)
    tl.store(lse_ptr + r, lse)
    if RETURN_ENTROPY:
        tl.store(ent_ptr + r, lse - sz / s)


@triton.jit
def _logits_bwd_kernel(
    logits_ptr, ids_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, grad_ptr,
    T, V, s_b, s_t, s_ids_b, s_ids_t, g_s_b, g_s_t, temperature,
    HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    row = logits_ptr + b * s_b + t * s_t
    out = grad_ptr + b * g_s_b + t * g_s_t
    lse = tl.load(lse_ptr + r)
    g_logp = tl.load(g_logp_ptr + r).to(tl.float32)
    token = tl.load(ids_ptr + b * s_ids_b + t * s_ids_t)
    if HAS_ENTROPY_GRAD:
        g_ent = tl.load(g_ent_ptr + r).to(tl.float32)
        mean_z = lse - tl.load(ent_ptr + r)  # E_p[z] = logsumexp - H
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        keep = offs < V
        z = tl.load(row + offs, mask=keep, other=0.0).to(tl.float32) / temperature
        p = tl.exp(z - lse)
        dz = g_logp * (tl.where(offs == token, 1.0, 0.0) - p)
        if HAS_ENTROPY_GRAD:
            dz -= tl.where(p > 0, g_ent * p * (z - mean_z), 0.0)
        tl.store(out + offs, (dz / temperature).to(grad_ptr.dtype.element_ty), mask=keep)


def vocab_contiguous(logits: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch and time strides, but a unit vocabulary stride."""
    return logits if logits.stride(2) == 1 else logits.contiguous()


def token_logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, temperature: float,
                           return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)``, fp32 ``[B, T]`` each; ``entropy`` is empty without ``return_entropy``."""
    B, T, V = logits.shape
    x = vocab_contiguous(logits)
    dev = logits.device
    logp = torch.empty((B, T), dtype=torch.float32, device=dev)
    lse = torch.empty((B, T), dtype=torch.float32, device=dev)
    entropy = torch.empty((B, T) if return_entropy else (0,), dtype=torch.float32, device=dev)
    bv, warps = block_v(V)
    if B * T:
        _logits_fwd_kernel[(B * T,)](
            x, ids, logp, entropy if return_entropy else lse, lse, T, V, x.stride(0), x.stride(1), ids.stride(0),
            ids.stride(1), float(temperature), RETURN_ENTROPY=return_entropy, BLOCK_V=bv, num_warps=warps,
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
            float(temperature), HAS_ENTROPY_GRAD=has_ent_grad, BLOCK_V=bv, num_warps=warps,
        )
