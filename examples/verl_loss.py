"""GRPO steps with verl's own loss and advantage entry points, switched to rlloss by name, on a CPU.

A verl run switches to rlloss with one config line each (``rlloss`` registers itself when
``import verl`` loads the ``verl.plugins`` entry point)::

    actor_rollout_ref.actor.policy_loss.loss_mode=rlloss_ppo     # or rlloss_cispo, rlloss_gmpo, ...
    algorithm.adv_estimator=rlloss_grpo

(beside verl's own required settings: its actor config refuses a run without
``ppo_micro_batch_size_per_gpu`` or ``use_dynamic_bsz``, whatever the loss; below, ``use_dynamic_bsz=True``).

verl's full trainer needs a Ray cluster and GPU workers, so this script runs the two verl
functions those lines select, inside a minimal loop a laptop runs in seconds: a tiny Qwen2 built
from a config samples completions, verl's ``compute_advantage`` (``ray_trainer``) computes the
advantages with ``rlloss_grpo``, and verl's ``ppo_loss`` (``workers/utils/losses.py``, what the
actor calls) computes the loss with ``loss_mode=rlloss_ppo`` (plus verl's own KL term); the
task: answer the prompt ``a b`` with the digit ``(a + b) % 10``.

    python examples/verl_loss.py
    python examples/verl_loss.py --loss-mode rlloss_cispo --adv-estimator rlloss_rloo
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import verl  # loads the rlloss plugin through the verl.plugins entry point
from tensordict import TensorDict
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

import rlloss.integrations.verl  # noqa: F401  (verl loads it by itself through the entry point once installed)

PAD, EOS, DIGIT0 = 0, 1, 2  # token ids: digits d are DIGIT0 + d


def response_logprobs(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` log-probs of the response tokens (prompts all of the same length, no padding)."""
    ids = torch.cat([prompts, responses], 1)
    logits = model(input_ids=ids).logits[:, prompts.shape[1] - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, responses[..., None]).squeeze(-1)


def verl_layout(logp: torch.Tensor, prompt_len: int, mask: torch.Tensor) -> torch.Tensor:
    """verl's no-padding model output: per row, the prompt then the response, shifted by one token."""
    rows = [torch.cat([logp.new_zeros(prompt_len - 1), logp[i, :n], logp.new_zeros(1)])
            for i, n in enumerate(mask.sum(-1).tolist())]
    return torch.cat(rows)


def main(steps: int = 10, loss_mode: str = "rlloss_ppo", adv_estimator: str = "rlloss_grpo", seed: int = 0,
         quiet: bool = False) -> list[dict[str, float]]:
    """Run ``steps`` GRPO steps; return one row (loss, reward) per step."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=DIGIT0 + 10, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    model = Qwen2ForCausalLM(config)
    reference = Qwen2ForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # use_dynamic_bsz=True: verl's own rule, whatever the loss (ActorConfig asserts that ppo_micro_batch_size_per_gpu
    # or use_dynamic_bsz is set; a full run sets actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=<n>); this loop
    # passes one micro-batch per step
    actor = ActorConfig(strategy="fsdp", rollout_n=8, use_dynamic_bsz=True, loss_agg_mode="token-mean",
                        clip_ratio_low=0.2, clip_ratio_high=0.28, use_kl_loss=True, kl_loss_coef=0.01,
                        policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    algorithm = AlgoConfig(adv_estimator=adv_estimator)
    groups, group_size, max_len = 8, actor.rollout_n, 6
    rows = []
    for step in range(steps):
        # sample: `groups` prompts "a b", `group_size` completions each
        a, b = torch.randint(0, 10, (2, groups))
        prompts = torch.stack([a, b], 1).repeat_interleave(group_size, 0) + DIGIT0
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 max_new_tokens=max_len, min_new_tokens=1, pad_token_id=PAD, eos_token_id=EOS)
        responses = torch.nn.functional.pad(out[:, prompts.shape[1]:], (0, max_len), value=PAD)[:, :max_len]
        ended = (responses == EOS).cumsum(-1)
        mask = (ended == 0) | ((ended == 1) & (responses == EOS))  # up to and including the first EOS
        answer = ((a + b) % 10 + DIGIT0).repeat_interleave(group_size)
        correct = ((responses == answer[:, None]) & mask).sum(-1) / mask.sum(-1).clamp(min=1)
        token_rewards = torch.zeros(responses.shape)
        token_rewards[torch.arange(len(correct)), mask.sum(-1) - 1] = correct.float()  # reward on the last token

        # advantages: verl's compute_advantage with the configured estimator
        uids = np.repeat(np.array([f"prompt-{step}-{g}" for g in range(groups)], dtype=object), group_size)
        batch = verl.DataProto.from_dict(tensors={"token_level_rewards": token_rewards, "response_mask": mask.float()},
                                         non_tensors={"uid": uids})
        advantages = compute_advantage(batch, adv_estimator, config=algorithm).batch["advantages"]

        # one policy update: verl's ppo_loss with the configured loss_mode (on-policy: old = current)
        with torch.no_grad():
            old = response_logprobs(model, prompts, responses)
            ref = response_logprobs(reference, prompts, responses)
        logp = response_logprobs(model, prompts, responses)
        data = TensorDict({"prompts": prompts, "responses": responses,
                           "attention_mask": torch.cat([torch.ones_like(prompts), mask.long()], 1),
                           "response_mask": mask.long(), "old_log_probs": old, "advantages": advantages,
                           "ref_log_prob": ref}, batch_size=[len(prompts)])
        counts = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": len(prompts)}
        for key, value in counts.items():  # what verl's trainer sets before calling ppo_loss
            tu.assign_non_tensor_data(data, key, value)
        loss, _ = ppo_loss(actor, {"log_probs": verl_layout(logp, prompts.shape[1], mask)}, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rows.append({"step": step + 1, "loss": loss.item(), "reward": correct.mean().item()})
        if not quiet:
            print(f"step {step + 1:>3}  loss {loss.item():>9.5f}  reward {correct.mean().item():.3f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--loss-mode", default="rlloss_ppo")
    parser.add_argument("--adv-estimator", default="rlloss_grpo")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    rows = main(cli.steps, cli.loss_mode, cli.adv_estimator, cli.seed)
    assert rows and all(math.isfinite(row["loss"]) for row in rows)
