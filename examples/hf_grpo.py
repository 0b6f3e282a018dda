"""rlloss with a Hugging Face causal LM: ``generate``, score, advantages, loss, gradient accumulation.

A hand-written GRPO-family loop around a ``transformers`` model, as a new user writes one, with the
details that silently change the objective done right (each is marked ``PITFALL`` below):

* **Sampling.** ``old_logp`` must be the log-probability under the distribution that sampled. Hugging
  Face ``generate`` samples with ``top_k=50`` by default (and a model's generation config may add
  ``top_p``), while ``rlloss.token_logprobs`` scores the full softmax: turn the truncation off
  (``do_sample=True, top_k=0, top_p=1.0``) and give ``token_logprobs`` the same ``temperature``.
* **The shift.** A causal LM's logits at position ``t`` score the token at ``t + 1``: the completion
  of a prompt of length ``P`` is scored by ``logits[:, P-1:-1]``.
* **Padding.** ``generate`` pads finished rows after their EOS; the loss mask keeps the tokens up to
  and including the first EOS. Padding ids never need to be valid tokens (``mask=``).
* **Dr. GRPO's normaliser** is the generation budget ``max_new_tokens``, a constant: not
  ``completions.shape[1]``, the width ``generate`` happened to return, which changes from batch
  to batch (it stops when every row has ended) and brings back the length bias Dr. GRPO removes.
* **DAPO's overlong filter** masks responses cut by the budget: those with **no EOS**. ``length >=
  width`` would also drop a response that ended with EOS exactly on the last allowed token.
* **Groups.** The ``G`` responses of a prompt are contiguous here: ``group_size=G``. (``groups=`` is
  for a tensor of group ids; an int there is refused, since ``groups=8`` reads as "8 groups".)
* **Gradient accumulation** with the step's counts (``rlloss.distributed.step_counts``): the sum of
  the micro-batch losses is then the full-batch objective, whatever the split.

The model is a tiny Qwen2 (``Qwen2Config``: hidden 64, 2 layers, about 100k parameters) built from
its config: no download. The vocabulary is hand-made, 16 tokens (``<pad> <bos> <eos> + = ?`` and the
ten digits); a prompt is ``<bos> a + b =`` with digits ``a, b`` in ``0..2``, and the verifier, a
Python function, gives reward 1 to a response that ends (EOS) and starts with the digit ``a + b``,
else 0. A random model almost never writes EOS, so ``--warmup`` supervised steps first teach the
format ``<digit> <eos>`` with random digits (what pre-training gives a real model), not the answers.
Every sampled batch is reused for ``--updates`` optimiser steps (the later ones off-policy, where
the ratio and its clip matter), each accumulated over ``--micro`` micro-batches.

Usage (a laptop CPU, about 10 seconds; one torch thread)::

    python examples/hf_grpo.py --recipe dr_grpo
    python examples/hf_grpo.py --recipe dapo --steps 60
    TRITON_INTERPRET=1 python examples/hf_grpo.py --from-hidden --backend triton

``--from-hidden`` takes the loss from the last hidden states and ``lm_head.weight``
(``policy_loss_from_hidden``: the Triton backend forms the gradient in its forward, from bounded
logits tiles, and never holds the logits); the same loss and gradients as from the logits.

Each line shows the step's mean reward, accuracy, the fraction of responses truncated (no EOS), the
valid tokens trained on (``metrics["num_tokens"]`` summed over micro-batches) and the loss; the
last line compares the accuracy of the first and last quarters of the run (seed 0, 40 steps: about
0.1 rising to about 0.35 for both recipes; the tiny policy then settles on one answer per prompt).
A DAPO step whose filters leave no token trains on nothing: ``num_tokens`` is 0 and rlloss warns
(``rlloss.EmptyBatchWarning``, once per call site).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import rlloss

VOCAB = ["<pad>", "<bos>", "<eos>", "+", "=", "?", *"0123456789"]
PAD, BOS, EOS = 0, 1, 2
DIGIT0 = VOCAB.index("0")
PROMPT_LEN = 5  # <bos> a + b =   (every prompt has this length: no left padding needed)


@dataclasses.dataclass(frozen=True)
class Config:
    recipe: str = "dr_grpo"  # "dr_grpo" or "dapo"
    steps: int = 40
    prompts: int = 8  # prompts per batch
    group: int = 8  # responses per prompt (G)
    max_new_tokens: int = 6  # the generation budget: Dr. GRPO's max_tokens
    temperature: float = 0.9  # the sampler's, given to token_logprobs as well
    updates: int = 2  # optimiser steps per sampled batch
    micro: int = 2  # micro-batches per optimiser step (gradient accumulation)
    lr: float = 3e-3
    warmup: int = 10  # supervised steps that teach the format (digit, EOS) before RL
    hidden: int = 64
    layers: int = 2
    seed: int = 0
    from_hidden: bool = False  # the loss from the last hidden states and lm_head.weight: no logits
    backend: str = "auto"  # "triton" runs the fused kernels (on a CPU: TRITON_INTERPRET=1)


RECIPES = {"dr_grpo": rlloss.DR_GRPO, "dapo": rlloss.DAPO}


def build_model(cfg: Config) -> Qwen2ForCausalLM:
    """A tiny Qwen2 from its config (random weights, seeded): nothing is downloaded."""
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )
    return Qwen2ForCausalLM(config)


def make_prompts(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts ``<bos> a + b =`` ``[n, PROMPT_LEN]`` and their answers ``a + b`` ``[n]``."""
    a, b = torch.randint(0, 3, (2, n), generator=gen)
    col = lambda v: torch.full((n,), v)  # noqa: E731
    prompts = torch.stack([col(BOS), DIGIT0 + a, col(VOCAB.index("+")), DIGIT0 + b, col(VOCAB.index("="))], 1)
    return prompts, a + b


def reward(answer: int, completion: list[int]) -> float:
    """The verifier: 1 if the response ends (EOS) and its first token is the digit ``answer``, else 0.

    A response cut by the budget gave no final answer: 0, as math verifiers do.
    """
    return 1.0 if completion and completion[0] == DIGIT0 + answer and completion[-1] == EOS else 0.0


def warm_up(model: Qwen2ForCausalLM, cfg: Config, gen: torch.Generator) -> None:
    """Teach the format ``<digit> <eos>`` with random digits (not the answers), as pre-training would.

    RL starts from a model that ends its responses; a random one almost never writes EOS, and
    DAPO's overlong filter would then leave nothing to train on.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.warmup):
        prompts, _ = make_prompts(cfg.prompts * cfg.group, gen)
        digits = DIGIT0 + torch.randint(0, 10, (prompts.shape[0], 1), generator=gen)
        sequences = torch.cat([prompts, digits, torch.full_like(digits, EOS)], 1)
        logits = completion_logits(model, sequences)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 sequences[:, PROMPT_LEN:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def generate_kwargs(cfg: Config) -> dict[str, Any]:
    # PITFALL: generate's default top_k=50 (and any top_p) samples from a truncated distribution;
    # old_logp from the full softmax would then not be the sampler's. Turn both off.
    return {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "pad_token_id": PAD, "eos_token_id": EOS}


def completion_mask(completions: torch.Tensor) -> torch.Tensor:
    """True up to and including the first EOS of each row; generate's padding after it is False."""
    is_eos = completions == EOS
    return (is_eos.cumsum(1) - is_eos.long()) == 0


def completion_logits(model: Qwen2ForCausalLM, sequences: torch.Tensor) -> torch.Tensor:
    # PITFALL: position t of a causal LM scores token t+1: the completion is scored by [P-1, -1).
    return model(input_ids=sequences).logits[:, PROMPT_LEN - 1:-1]


@torch.no_grad()
def sample_batch(model: Qwen2ForCausalLM, cfg: Config, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Sample ``prompts x group`` responses; score them; the sampler's log-probs as ``old_logp``."""
    prompts, answers = make_prompts(cfg.prompts, gen)
    inputs = prompts.repeat_interleave(cfg.group, 0)  # the G responses of a prompt are contiguous
    answers = answers.repeat_interleave(cfg.group, 0)
    model.eval()
    sequences = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **generate_kwargs(cfg))
    completions = sequences[:, PROMPT_LEN:]  # [N, W], W <= max_new_tokens: generate may stop early
    mask = completion_mask(completions)
    truncated = ~(completions == EOS).any(1)  # PITFALL: cut by the budget = no EOS (not length >= W)
    rewards = torch.tensor([reward(int(a), c[m].tolist()) for a, c, m in zip(answers, completions, mask)])
    # old_logp: the same temperature as the sampler's; generate's padding ids are masked, never read
    old_logp = rlloss.token_logprobs(completion_logits(model, sequences), completions, temperature=cfg.temperature,
                                     mask=mask)
    return {"sequences": sequences, "completions": completions, "mask": mask, "truncated": truncated,
            "rewards": rewards, "old_logp": old_logp}


def prepare(batch: dict[str, torch.Tensor], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's advantages ``[N]`` and the loss mask ``[N, W]`` (DAPO's filters applied)."""
    recipe = RECIPES[cfg.recipe]
    adv = recipe.advantages(batch["rewards"], group_size=cfg.group)  # not groups=cfg.group: see the docstring
    mask = batch["mask"]
    if cfg.recipe == "dapo":
        # overlong filtering: truncated responses (no EOS) are left out of the loss
        mask = mask & ~batch["truncated"][:, None]
        # dynamic sampling: a group whose rewards are all equal has no signal; DAPO samples more
        # prompts to replace it, this loop only leaves it out (so it does not dilute token_mean)
        mask = mask & rlloss.dynamic_sampling_mask(batch["rewards"], group_size=cfg.group)[:, None]
    return adv, mask


def micro_slices(n: int, micro: int) -> list[slice]:
    size = -(-n // micro)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def micro_loss(model: Qwen2ForCausalLM, batch: dict[str, torch.Tensor], adv: torch.Tensor, mask: torch.Tensor,
               s: slice, counts: rlloss.distributed.StepCounts, cfg: Config) -> rlloss.PolicyLoss:
    """The loss of micro-batch ``s`` with the step's counts: the micro-batch losses sum to the step's."""
    extra = {"max_tokens": cfg.max_new_tokens} if cfg.recipe == "dr_grpo" else {}  # PITFALL: the budget
    options = dict(temperature=cfg.temperature, backend=cfg.backend, **RECIPES[cfg.recipe].loss_kwargs(), **extra,
                   **counts.kwargs())
    args = (batch["completions"][s], batch["old_logp"][s], adv[s], mask[s])
    if cfg.from_hidden:  # the LM head inside the loss: the model's forward keeps one position's logits
        out = model(input_ids=batch["sequences"][s], output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, PROMPT_LEN - 1:-1]  # PITFALL: the same shift as the logits'
        return rlloss.policy_loss_from_hidden(hidden, model.lm_head.weight, *args, **options)
    return rlloss.policy_loss_from_logits(completion_logits(model, batch["sequences"][s]), *args, **options)


def train_step(model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, cfg: Config,
               gen: torch.Generator) -> dict[str, float]:
    batch = sample_batch(model, cfg, gen)
    adv, mask = prepare(batch, cfg)
    slices = micro_slices(mask.shape[0], cfg.micro)
    counts = rlloss.distributed.step_counts([mask[s] for s in slices])  # once per optimiser step
    model.train()
    losses, tokens = [], 0.0
    for _ in range(cfg.updates):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for s in slices:
            out = micro_loss(model, batch, adv, mask, s, counts, cfg)
            out.loss.backward()  # summed over micro-batches: no division by their number
            loss_sum += float(out.loss.detach())
            tokens += float(out.metrics["num_tokens"])
        optimizer.step()
        losses.append(loss_sum)
    answers_right = batch["rewards"] > 0  # the right digit first
    return {"reward": float(batch["rewards"].mean()), "acc": float(answers_right.float().mean()),
            "truncated": float(batch["truncated"].float().mean()), "num_tokens": tokens / cfg.updates,
            "loss": losses[0]}


def train(cfg: Config, log: Any = None) -> list[dict[str, float]]:
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    warm_up(model, cfg, gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rows = []
    for step in range(cfg.steps):
        rows.append(train_step(model, optimizer, cfg, gen))
        if log is not None:
            log(step, rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=defaults.recipe)
    for field in ("steps", "prompts", "group", "max_new_tokens", "updates", "micro", "warmup", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    for field in ("temperature", "lr"):
        parser.add_argument(f"--{field}", type=float, default=getattr(defaults, field))
    parser.add_argument("--from-hidden", action="store_true",
                        help="the loss from the last hidden states and lm_head.weight (policy_loss_from_hidden)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default=defaults.backend)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors this small run fastest on one thread (several cost ~8x the CPU time)
    cfg = dataclasses.replace(defaults, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                                           if hasattr(args, f.name)})

    def log(step: int, row: dict[str, float]) -> None:
        print(f"step {step:3d}  reward {row['reward']:.3f}  acc {row['acc']:.3f}  truncated {row['truncated']:.2f}  "
              f"num_tokens {row['num_tokens']:5.0f}  loss {row['loss']:+.4f}", flush=True)

    rows = train(cfg, log)
    first, last = rows[: len(rows) // 4 or 1], rows[-(len(rows) // 4 or 1):]
    mean = lambda rs: sum(r["acc"] for r in rs) / len(rs)  # noqa: E731
    print(f"{cfg.recipe}: accuracy {mean(first):.3f} over the first quarter of steps, {mean(last):.3f} over the last")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
