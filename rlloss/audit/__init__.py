"""``rlloss.audit``: measure what a trainer's loss really optimises, from its own code.

``audit_loss(loss_fn, *, micro_batches=1, dp_size=1, max_tokens=None, seed=0)`` feeds one
micro-batch's loss (a trainer's own code, its normaliser and accumulation scaling included)
synthetic on-policy batches split across micro-batches and ranks, forms each optimizer step's
gradient by autograd as DDP/FSDP do, and names the rlloss aggregation it matches, the scale, how
far it is from any aggregation, whether it depends on the split, and the weight of a token as a
function of its row's length. The trainer front ends run the trainers' own code paths:

* ``audit_trl(config)``: TRL's ``GRPOTrainer`` (``_compute_loss`` and the train loop's scaling) on
  a ``trl.GRPOConfig``, with its gradient accumulation, steps per generation and processes;
* ``audit_verl(actor_config)``: verl's ``ppo_loss`` / ``agg_loss`` with its ``global_batch_info``.

Command line: ``python -m rlloss.audit trl --loss-type dapo --gradient-accumulation-steps 4
--steps-per-generation 8`` (or ``verl --loss-agg-mode token-mean``; ``table`` for every
configuration) prints the report and writes the plot. ``import rlloss`` does not import this
package, and this package imports a trainer only when its front end is called, matplotlib only
when a plot is drawn. docs/audit.md says what the probe can and cannot see.
"""

from .measure import Window, audit_loss
from .result import Audit
from .trl import audit_trl
from .verl import audit_verl

__all__ = ["Audit", "Window", "audit_loss", "audit_trl", "audit_verl"]
