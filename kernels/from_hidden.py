"""Fused ``policy_loss_from_hidden``, the loss path: the loss's gradient formed in the forward, 3 matmuls.

Mirrors ``rlloss.hidden.policy_loss_from_hidden`` (``linear_token_logprobs``, then ``policy_loss``
minus ``entropy_coef`` times the aggregated entropy) for a token-local objective: one whose
d loss / d logp at a token is known once that token's log-prob is (PPO at token level and its
variants, CISPO, SAPO, REINFORCE, DPPO, DRO, any KL kind and token-level bias correction, token
weights). Each chunk of ``kernels.linear_logprobs.run_chunks`` then goes, in the forward, from its
logits tile to its log-probs, to ``_policy_loss_fwd_kernel``'s per-token gradient (``kernels.policy_loss``,
the same kernel ``policy_loss`` runs, on the chunk's gathered inputs) times the aggregation's
per-token weight, to ``d logits`` and the ``d hidden`` / ``d weight`` products: the logits are
computed once. After the last chunk, ``policy_loss_forward`` on the whole ``[B, T]`` log-probs and
entropies gives the loss and the metrics (the numbers ``policy_loss_from_logits`` gives). Backward
multiplies the stored gradients by the upstream scalar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear_logprobs import Chunks, TileSteps, run_chunks
from .policy_loss import per_token_pass, policy_loss_forward


def _pick(x: torch.Tensor | None, idx: torch.Tensor, T: int) -> torch.Tensor | None:
    """The chunk's values ``[1, C]`` of a per-token ``[B, T]`` or per-row ``[B]`` input (None stays None)."""
    if x is None:
        return None
    return (x.reshape(-1).index_select(0, idx) if x.dim() == 2 else x.index_select(0, idx // T))[None]


def loss_upstream(token_grad: Callable, T: int, old_logp: torch.Tensor | None, adv: torch.Tensor,
                  ref_logp: torch.Tensor | None, token_weights: torch.Tensor | None, token_scale: torch.Tensor,
                  entropy_coef: float) -> Callable:
    """``run_chunks``'s ``upstream`` for the loss: ``g_logp = token_grad(...) * scale`` and ``g_entropy =
    -entropy_coef * scale`` per token, ``scale`` the aggregation's weight of the token in the loss
    (``token_scale`` ``[B, T]``, 0 where masked: ``rlloss.aggregation._token_scale``).

    ``token_grad(logp, old_logp, adv, ok, ref_logp, token_weights) -> [1, C]``: d l / d logp of the
    per-token loss before the normaliser, on ``[1, C]`` inputs (``policy_loss``'s kernel: the raw
    launch inside an op, the op when traced).
    """
    scale_flat = token_scale.reshape(-1)

    def upstream(idx: torch.Tensor, ok: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor):
        g = token_grad(logp[None], _pick(old_logp, idx, T), _pick(adv, idx, T), ok[None], _pick(ref_logp, idx, T),
                       _pick(token_weights, idx, T))
        scale = scale_flat.index_select(0, idx)
        return g[0].float() * scale, (-entropy_coef * scale if entropy_coef != 0 else None)

    return upstream


def raw_token_grad(**loss_args) -> Callable:
    """``token_grad`` for ``loss_upstream`` by the raw launch of ``policy_loss``'s per-token kernel."""
    keep = ("objective", "dual_or_low", "delta_or_high", "params", "row_stat", "beta", "kl_kind", "kl_bias_correction",
            "max_log_ratio")
    options = {k: loss_args[k] for k in keep}

    def token_grad(logp, old_logp, adv, ok, ref_logp, token_weights):
        g, *_ = per_token_pass(logp, old_logp, adv, ok, ref_logp, token_weights=token_weights, write_grad=True,
                               write_partials=False, write_token_loss=False, **options)
        return g

    return token_grad


def policy_loss_from_hidden_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    token_scale: torch.Tensor,
    num_tokens: torch.Tensor | None,
    num_seqs: torch.Tensor | None,
    *,
    temperature: float,
    entropy_coef: float,
    rows: int,
    need_hidden: bool,
    need_weight: bool,
    **loss_args,
) -> tuple[torch.Tensor, torch.Tensor, Chunks]:
    """``(loss, metrics, chunks)``: ``policy_loss_forward``'s loss and metrics (entropy mean included),
    and ``run_chunks``'s outputs, its gradients formed for an upstream gradient of 1.

    ``hidden`` ``[B, T, H]``, ``ids`` and ``mask`` ``[B, T]``, the loss inputs as ``policy_loss``'s
    fused kernel takes them (``loss_args``: its codes and numbers).
    """
    B, T = mask.shape
    upstream = None
    if need_hidden or need_weight:
        upstream = loss_upstream(raw_token_grad(**loss_args), T, old_logp, adv, ref_logp, token_weights, token_scale,
                                 entropy_coef)
    chunks = run_chunks(hidden, weight, bias, ids.reshape(-1), mask.reshape(-1), temperature, rows, upstream=upstream,
                        need_hidden=need_hidden, need_weight=need_weight, steps=TileSteps())
    loss, metrics, *_ = policy_loss_forward(
        chunks.logp.view(B, T), old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, needs_grad=False,
        entropy=chunks.entropy.view(B, T), entropy_coef=entropy_coef, **loss_args)
    return loss, metrics, chunks
