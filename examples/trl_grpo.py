"""GRPO with TRL's trainer and rlloss's loss, on a laptop CPU in well under a minute.

The only change from a stock TRL script is the import of ``GRPOTrainer`` (and, optionally, an
rlloss objective TRL does not have). The model is a tiny Qwen2 built from a config (no
download), the tokenizer a word-level one over the digits; the task: answer the prompt ``a b``
with the digit ``(a + b) % 10`` as often as possible in 6 tokens.

    python examples/trl_grpo.py                      # TRL's loss_type="dapo", computed by rlloss
    python examples/trl_grpo.py --objective gmpo     # an objective TRL lacks (with loss_type="grpo")
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig

import rlloss
from rlloss.integrations.trl import GRPOTrainer  # instead of: from trl import GRPOTrainer

VOCAB = ["<pad>", "<eos>"] + [str(d) for d in range(10)]
OBJECTIVES = {"none": None, "gmpo": rlloss.GMPO(), "dppo": rlloss.DPPO(), "cispo": rlloss.CISPO()}


def tiny_model(path: str, seed: int) -> PreTrainedTokenizerFast:
    """Save a tiny Qwen2 and a word-level tokenizer to ``path``; return the tokenizer."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    config = Qwen2Config(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def sum_digit_reward(prompts, completions, **kwargs):
    """The fraction of completion tokens equal to ``(a + b) % 10``."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        a, b = (int(w) for w in prompt.split())
        words = completion.split()
        rewards.append(sum(w == str((a + b) % 10) for w in words) / max(len(words), 1))
    return rewards


def main(steps: int = 8, objective: str = "none", seed: int = 0, quiet: bool = False) -> list[dict[str, float]]:
    """Train for ``steps`` optimizer steps; return TRL's log rows (loss, reward, ...) per step."""
    with tempfile.TemporaryDirectory() as path:
        tokenizer = tiny_model(path, seed)
        prompts = [f"{a} {b}" for a in range(10) for b in range(10)]
        args = GRPOConfig(
            output_dir=f"{path}/out", loss_type="grpo" if objective == "gmpo" else "dapo", beta=0.0,
            per_device_train_batch_size=16, num_generations=8, max_completion_length=6, gradient_accumulation_steps=2,
            steps_per_generation=2, learning_rate=3e-3, max_steps=steps, logging_steps=1, use_cpu=True, bf16=False,
            report_to=[], save_strategy="no", seed=seed, temperature=1.0, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=path, reward_funcs=sum_digit_reward, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), objective=OBJECTIVES[objective])
        trainer.remove_callback(PrinterCallback)  # the table below instead of TRL's raw dicts
        trainer.train()
        rows = [row for row in trainer.state.log_history if "loss" in row and "reward" in row]
    if not quiet:
        print(f"{'step':>4}  {'loss':>10}  {'reward':>7}  {'entropy':>7}")
        for row in rows:
            print(f"{row['step']:>4}  {row['loss']:>10.5f}  {row['reward']:>7.3f}  {row['entropy']:>7.3f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="none")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    rows = main(cli.steps, cli.objective, cli.seed)
    assert rows and all(math.isfinite(row["loss"]) for row in rows)
