"""Fused ``policy_loss_from_logits``: the loss, its metrics and d loss / d logits in five launches.

Mirrors ``rlloss.logits.policy_loss_from_logits`` (``token_logprobs`` then ``policy_loss`` minus
``entropy_coef`` times the aggregated entropy) without the per-token torch glue between them:

1. ``_logits_fwd_kernel`` (``kernels.logits``): per valid position, ``logp``, the entropy and the
   logsumexp in one read of its logits; masked positions read nothing (their ids neither).
2. ``_policy_loss_fwd_kernel`` (``kernels.policy_loss``): the per-token loss minus
   ``entropy_coef * H``, d loss / d logp, and the partial sums, the entropy's among them.
3. ``_combine_kernel``: the loss and the metrics, the entropy mean included, and the normaliser.
4. backward, ``_logits_bwd_kernel`` with ``FROM_LOSS``: d loss / d logits from the stored
   d loss / d logp, the normaliser and the entropy coefficient, in one more read of the logits.

Before them, ``_ids_in_vocab_kernel`` checks that every id read lies in the vocabulary (one program;
a device-side assert on a GPU, a ``ValueError`` in the interpreter): 5 launches, GSPO and VESPO 6
with their row-statistics launch. No host sync.
"""

from __future__ import annotations

import torch

from .logits import check_ids_in_vocab, token_logprobs_forward
from .policy_loss import policy_loss_forward


def policy_loss_from_logits_forward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    token_weights: torch.Tensor | None,
    num_tokens: torch.Tensor | None,
    num_seqs: torch.Tensor | None,
    *,
    temperature: float,
    entropy_coef: float,
    needs_grad: bool,
    **loss_args,
) -> tuple[torch.Tensor, ...]:
    """``(loss, metrics, lse, entropy, g, factor, row_factor)``; ``loss_args`` as ``policy_loss_forward``'s."""
    check_ids_in_vocab(ids, mask, logits.shape[2])
    logp, entropy, lse = token_logprobs_forward(logits, ids, temperature, True, mask=mask)
    loss, metrics, g, factor, row_factor = policy_loss_forward(
        logp, old_logp, adv, mask, ref_logp, token_weights, num_tokens, num_seqs, needs_grad=needs_grad,
        entropy=entropy, entropy_coef=entropy_coef, **loss_args,
    )
    return loss, metrics, lse, entropy, g, factor, row_factor
