"""``audit_trl``: the objective TRL's ``GRPOTrainer`` optimises for a ``GRPOConfig``, from TRL's own code.

A real trainer is built from the config on a tiny Qwen2 saved to a temporary folder (CPU, no hub),
and every micro-batch of a probe step goes through TRL's own ``training_step``: transformers'
scaling around ``compute_loss`` (TRL's ``loss_is_scaled_for_ga``), TRL's ``_compute_loss`` (its
``loss_type`` branch and normaliser, the accumulation factor it reads from
``current_gradient_accumulation_steps``, ``num_items_in_batch`` and ``steps_per_generation``) and
``accelerator.backward``. Only two methods are replaced on the instance: the log-probs
(``_get_per_token_logps_and_entropies`` returns the probe's ``logp``, so the gradient is taken in
it) and ``_prepare_inputs`` (the probe's micro-batch instead of a generated one).

What TRL's train loop would hand each micro-batch is rebuilt as TRL builds it:
``num_items_in_batch`` counts the loss tokens of the micro-batch's whole generation batch over all
processes (``_generate_and_score_completions``); a generation batch is ``steps_per_generation``
consecutive micro-batches; the audited step is the first of a generation, and micro-batches of
its generation(s) that fall outside the step repeat the step's own (micro-batch ``m`` for
``GA + m``: the probe's steps are alike). ``old_per_token_logps`` is present exactly when TRL
computes it (``gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0``), equal
to the log-probs (on-policy); ``ref_per_token_logps`` too (``beta != 0``: the KL and its gradient
are 0 there). Processes are emulated in one: the trainer's accelerator reports
``num_processes = P`` and this rank's index to ``_compute_loss``, and the ranks' gradients are
averaged as DDP does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .measure import PieceInputs, _check_int, accumulate, audit_steps
from .probe import Batch, Piece, Split
from ..integrations import EXTRAS
from .result import Audit

VOCAB = ["<pad>", "<eos>"] + [str(i) for i in range(30)]


def _import_trl() -> Any:
    try:
        import trl
    except ImportError as exc:
        raise ImportError(f"rlloss.audit.audit_trl needs TRL, which failed to import ({exc}); install the tested "
                          f"version with: {EXTRAS['trl']} (in the root of rlloss's checkout)") from exc
    return trl


def _tiny_checkpoint(path: Path) -> Any:
    """A tiny Qwen2 and a word-level tokenizer saved to ``path``; returns the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def _constant_reward(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward function for the constructor: the probe never generates, so it is never called."""
    return [0.0] * len(completions)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars and info, and TRL's logged hints, off while the tiny trainer is built."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    trl_logger = logging.getLogger("trl")
    trl_level = trl_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    trl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        trl_logger.setLevel(trl_level)


class _Processes:
    """The trainer's accelerator, reporting ``num_processes`` and ``process_index`` of an emulated rank."""

    def __init__(self, accelerator: Any, num_processes: int, process_index: int) -> None:
        self._accelerator = accelerator
        self.num_processes = num_processes
        self.process_index = process_index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def build_trainer(config: Any, folder: Path, trainer_cls: Any = None) -> Any:
    """A ``trainer_cls`` (default ``trl.GRPOTrainer``) built from ``config`` on a tiny model, on the CPU.

    The config is copied with what a CPU run in ``folder`` needs (``use_cpu``, no bf16/fp16, no
    reporting or saving, vLLM off: the probe is on-policy, where vLLM's correction is 1) and
    ``generation_batch_size`` recomputed from ``steps_per_generation`` as TRL does; every field of
    the loss is the config's.
    """
    trl = _import_trl()
    from datasets import Dataset

    with _quiet():
        return _build(trl, Dataset, config, folder, trainer_cls)


def _build(trl: Any, dataset_cls: Any, config: Any, folder: Path, trainer_cls: Any) -> Any:
    tokenizer = _tiny_checkpoint(folder / "model")
    args = dataclasses.replace(config, output_dir=str(folder / "out"), use_cpu=True, bf16=False, fp16=False,
                               report_to=[], save_strategy="no", push_to_hub=False, use_vllm=False,
                               generation_batch_size=None, model_init_kwargs=None)
    dataset = dataset_cls.from_dict({"prompt": ["1 2 3"] * 8})
    cls = trl.GRPOTrainer if trainer_cls is None else trainer_cls
    with torch.random.fork_rng():  # TRL's constructor calls set_seed: keep the caller's RNG as it was
        trainer = cls(model=str(folder / "model"), reward_funcs=_constant_reward, args=args, train_dataset=dataset,
                      processing_class=tokenizer)
    trainer.model.train()
    return trainer


def _generation_tokens(split: Split, batch: Batch, accumulation: int, per_generation: int) -> dict[int, int]:
    """``num_items_in_batch`` of each micro-batch of the step: the loss tokens of its generation batch.

    Generation ``g`` holds micro-steps ``[g * spg, (g + 1) * spg)``; a micro-step past the step
    (``s >= GA``) repeats micro-batch ``s % GA`` of the step. Tokens are summed over all ranks.
    """
    lengths = batch.lengths
    per_micro = [0] * accumulation
    for piece in split.pieces:
        per_micro[piece.micro_batch] += int(lengths[piece.rows].sum())
    counts = {}
    for m in range(accumulation):
        start = (m // per_generation) * per_generation
        counts[m] = sum(per_micro[s % accumulation] for s in range(start, start + per_generation))
    return counts


def _trl_step(trainer: Any, num_processes: int) -> Callable[[Batch, Split], tuple[float, torch.Tensor]]:
    """The probe's step function: each piece through ``trainer.training_step``, as TRL's loop calls it."""
    args = trainer.args
    accumulation, per_generation = args.gradient_accumulation_steps, args.steps_per_generation
    # grpo_trainer.py, _generate_and_score_completions: old log-probs only when generation and steps are misaligned
    with_old = args.gradient_accumulation_steps % (per_generation * trainer.num_iterations) != 0
    current: dict[str, torch.Tensor] = {}

    def logps_and_entropies(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: Any,
                            *rest: Any, **options: Any) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        logp = current["logp"]
        entropy = torch.zeros_like(logp.detach()) if options.get("compute_entropy") else None
        return logp, entropy, None

    trainer._get_per_token_logps_and_entropies = logps_and_entropies
    trainer._prepare_inputs = lambda inputs: inputs
    trainer.current_gradient_accumulation_steps = accumulation
    accelerator = trainer.accelerator

    def step(batch: Batch, split: Split) -> tuple[float, torch.Tensor]:
        items = _generation_tokens(split, batch, accumulation, per_generation)

        def run_piece(piece: Piece, inputs: PieceInputs) -> tuple[float, torch.Tensor]:
            b, width = inputs.mask.shape
            micro = {
                "prompt_ids": torch.ones(b, 1, dtype=torch.long),
                "prompt_mask": torch.ones(b, 1, dtype=torch.long),
                "completion_ids": torch.ones(b, width, dtype=torch.long),
                "completion_mask": inputs.mask.long(),
                "advantages": inputs.adv,
                "num_items_in_batch": torch.tensor(items[piece.micro_batch]),
            }
            if with_old:
                micro["old_per_token_logps"] = inputs.old_logp
            if trainer.beta != 0.0:
                micro["ref_per_token_logps"] = inputs.old_logp
            current["logp"] = inputs.logp
            trainer.accelerator = _Processes(accelerator, num_processes, piece.rank)
            try:
                loss = trainer.training_step(trainer.model, micro, None)
            finally:
                trainer.accelerator = accelerator
            grad = inputs.logp.grad
            return float(loss), torch.zeros_like(inputs.logp) if grad is None else grad.detach()

        return accumulate(batch, split, run_piece, trainer.max_completion_length)

    return step


def audit_trl(config: Any, *, num_processes: int = 1, trainer_cls: Any = None, seed: int = 0) -> Audit:
    """Audit TRL's GRPO loss for ``config`` (a ``trl.GRPOConfig``), through TRL's own code.

    One optimizer step is ``gradient_accumulation_steps`` micro-batches on each of
    ``num_processes`` emulated processes; every micro-batch is passed to
    ``trainer.training_step`` of a ``trainer_cls`` (default ``trl.GRPOTrainer``; rlloss's
    ``rlloss.integrations.trl.GRPOTrainer`` works too) built from ``config`` on a tiny model, with
    ``num_items_in_batch`` counted over its generation batch of ``steps_per_generation``
    micro-batches as TRL counts it. Micro-batches of one step hold equal row counts (TRL's
    ``per_device_train_batch_size``; the probe varies it between batches to tell the normalisers
    apart). Candidates include ``constant`` with ``max_tokens = max_completion_length``.

    Args:
        config: the ``trl.GRPOConfig`` to audit (copied for a CPU run; see ``build_trainer``).
        num_processes: data-parallel processes, >= 1.
        trainer_cls: the trainer class, a ``trl.GRPOTrainer`` or a subclass; None for TRL's.
        seed: seeds the probe.

    Returns:
        the ``Audit``, labelled with TRL's version and the step's shape.
    """
    trl = _import_trl()
    if not isinstance(config, trl.GRPOConfig):
        raise TypeError(f"config must be a trl.GRPOConfig, got {type(config).__name__}")
    _check_int("num_processes", num_processes, 1)
    _check_int("seed", seed, 0)
    if trainer_cls is not None and not (isinstance(trainer_cls, type) and issubclass(trainer_cls, trl.GRPOTrainer)):
        raise TypeError(f"trainer_cls must be trl.GRPOTrainer or a subclass of it, got {trainer_cls!r}")
    with tempfile.TemporaryDirectory(prefix="rlloss-audit-") as folder:
        trainer = build_trainer(config, Path(folder), trainer_cls)
        args = trainer.args
        label = (f"TRL {trl.__version__} {type(trainer).__name__}: loss_type={args.loss_type!r}, "
                 f"gradient_accumulation_steps={args.gradient_accumulation_steps}, "
                 f"steps_per_generation={args.steps_per_generation}, processes={num_processes}")
        return audit_steps(_trl_step(trainer, num_processes), micro_batches=args.gradient_accumulation_steps,
                           dp_size=num_processes, max_tokens=trainer.max_completion_length, seed=seed,
                           longest=trainer.max_completion_length, width=None, equal_rows=True, label=label)
