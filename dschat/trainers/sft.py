"""Step 1 (supervised fine-tuning): loss on answer tokens; eval = perplexity and the builtin judge."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from dschat.data.collators import SFTCollator
from dschat.models.forward import label_logits
from dschat.models.loading import create_hf_model
from dschat.trainers.base import OneModelRun
from dschat.trainers.evaluation import perplexity


def lm_loss(engine, batch: dict, fp32: bool = True, padding_free: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over label tokens (from fp32 logits when `fp32`, else the model's dtype);
    the LM head runs on the label positions only, the rows padding-free if asked (dschat.models.forward)."""
    logits, targets, _ = label_logits(engine, batch, padding_free)
    loss = torch.nn.functional.cross_entropy(logits.float() if fp32 else logits, targets)
    return loss, {"tokens": float(batch["attention_mask"].sum())}


class SFTRun(OneModelRun):
    """One supervised fine-tuning run of a causal LM."""

    phase, name = 1, "step1"

    def __init__(self, args):
        super().__init__(args)
        # DeepSpeed-Chat's --compute_fp32_loss: without it the loss is computed in the model's dtype.
        self.fp32_loss = args.compute_fp32_loss or self.dtype == "fp32"

    def make_collator(self):
        """Right-padded input ids with -100 labels on prompt and padding."""
        return SFTCollator(self.tokenizer.pad_token_id)

    def build_model(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The causal LM from --model_name_or_path."""
        a = self.args
        return create_hf_model(AutoModelForCausalLM, a.model_name_or_path, self.tokenizer, ds_config, dtype,
                               a.dropout, a.gradient_checkpointing, a.trust_remote_code)

    def description(self) -> str:
        """Progress-bar label."""
        return "step1 SFT"

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token loss on the answer tokens (and the prompt's with --train_on_prompt)."""
        return lm_loss(engine, batch, self.fp32_loss, self.args.padding_free)

    def evaluate(self, when: str) -> dict:
        """Eval-split perplexity and, on the builtin task, the judge score of greedy held-out answers."""
        metrics = perplexity(self.engine, self.eval_loader, self.args.eval_iters, self.dev,
                             self.args.padding_free)
        return self.record(metrics | self.judge(), when)

    def save(self) -> None:
        """The fine-tuned model as a plain HF directory in --output_dir, with its eval history."""
        self.save_model(1)

    def summary(self) -> str:
        """Final lines: perplexity and judge before and after training."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 1 done in {time.time() - self.start:.0f}s: perplexity {first['perplexity']:.2f} -> "
                 f"{last['perplexity']:.2f}"]
        if "judge" in last:
            lines.append(f"judge score on {len(self.prompts)} held-out prompts: untrained {first['judge']:.3f}, "
                         f"SFT {last['judge']:.3f}")
        if self.args.output_dir:
            lines.append(f"model saved to {self.args.output_dir}")
        return "\n".join(lines)
