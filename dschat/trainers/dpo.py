"""DPO (an alternative to steps 2 and 3): the policy learns from chosen/rejected pairs directly, against a
frozen reference copy of the model it starts from; eval = DPO loss, implicit-reward accuracy/margin, judge.

Implicit reward of an answer: beta * (log pi(answer | prompt) - log ref(answer | prompt)), summed over the
answer's tokens (see dschat.algos.losses.dpo_loss).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM

from dschat.algos.losses import dpo_loss, logprobs_from_logits, row_sums
from dschat.data.collators import DPOCollator
from dschat.models.forward import label_logits
from dschat.models.loading import create_hf_model
from dschat.models.lora import WithoutAdapters
from dschat.runtime import dist
from dschat.runtime.ds_config import get_eval_ds_config
from dschat.runtime.engine import build_frozen_engine, to_device, torch_dtype
from dschat.trainers.base import OneModelRun


def pair_logprobs(engine, batch: dict, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (chosen [B], rejected [B]) of a [chosen; rejected] batch, in one forward that
    projects onto the vocabulary at the label tokens only (padding-free if asked)."""
    logits, targets, rows = label_logits(engine, batch, padding_free)
    return row_sums(logprobs_from_logits(logits, targets), rows, batch["labels"].shape[0]).chunk(2)


class DPORun(OneModelRun):
    """One DPO run: a causal LM trained on phase-2 pairs against a frozen reference (the same starting model)."""

    phase, name, shown = 2, "step2_dpo", ("loss", "acc", "margin")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        a = self.args
        stage = 3 if a.zero_stage == 3 else 0
        ref_cfg = get_eval_ds_config(stage=stage, dtype=self.dtype, world_size=dist.world_size(),
                                     micro_batch=a.per_device_train_batch_size, offload=a.offload and stage == 3)
        if a.lora_dim > 0 and a.only_optimize_lora and not a.no_shared_base:
            # LoRA-only training keeps the base weights as loaded: the reference is the policy, adapters off.
            self.ref = WithoutAdapters(self.engine)
            dist.print_rank0("reference: the policy with its LoRA adapters off (--only_optimize_lora), no copy")
        else:
            ref = create_hf_model(AutoModelForCausalLM, a.model_name_or_path, self.tokenizer,
                                  copy.deepcopy(ref_cfg), torch_dtype(self.dtype), None, False, a.trust_remote_code)
            self.ref = build_frozen_engine(ref, copy.deepcopy(ref_cfg))
        # Training batches' implicit-reward stats since the last evaluation (recorded with it).
        self.train_sums = torch.zeros(3, dtype=torch.float64)  # correct pairs, margin sum, pairs

    def make_collator(self) -> DPOCollator:
        """Chosen rows then rejected rows, right-padded [2B, L], labels -100 on prompt and padding."""
        return DPOCollator(self.tokenizer.pad_token_id)

    def build_model(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The policy: the causal LM from --model_name_or_path (normally step 1's output), without dropout unless
        --dropout is given (its log-probs are compared with the dropout-free reference's, as in TRL)."""
        a = self.args
        return create_hf_model(AutoModelForCausalLM, a.model_name_or_path, self.tokenizer, ds_config, dtype,
                               a.dropout, a.gradient_checkpointing, a.trust_remote_code, default_dropout=0.0)

    def description(self) -> str:
        """Progress-bar label."""
        return "step2 DPO"

    def _pair_loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO loss and stats of a [chosen; rejected] batch: the policy `engine` against the reference."""
        policy_chosen, policy_rejected = pair_logprobs(engine, batch, self.args.padding_free)
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(self.ref, batch, self.args.padding_free)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.args.beta,
                        self.args.loss_type)

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The --loss_type DPO loss, with the batch's implicit-reward accuracy, margin and mean rewards."""
        loss, stats = self._pair_loss(engine, batch)
        n = len(stats["chosen_rewards"])
        if torch.isfinite(stats["margin"]):  # a non-finite batch is skipped by the loop: leave it out here too
            self.train_sums += torch.tensor([stats["accuracy"].item() * n, stats["margin"].item() * n, n],
                                            dtype=torch.float64)
        return loss, {"acc": stats["accuracy"].item(), "margin": stats["margin"].item(),
                      "chosen_reward": stats["chosen_rewards"].mean().item(),
                      "rejected_reward": stats["rejected_rewards"].mean().item()}

    @torch.no_grad()
    def _eval_pairs(self) -> dict[str, float]:
        """DPO loss, implicit-reward accuracy, margin and mean rewards over the eval split, summed over ranks."""
        self.engine.eval()
        # sums: loss * pairs, correct pairs, margin, chosen rewards, rejected rewards, pairs
        sums = torch.zeros(6, dtype=torch.float64, device=self.dev)
        for i, batch in enumerate(self.eval_loader):
            if i >= self.args.eval_iters:
                break
            loss, stats = self._pair_loss(self.engine, to_device(batch, self.dev))
            c, r = stats["chosen_rewards"].double(), stats["rejected_rewards"].double()
            n = c.new_tensor(len(c))
            sums += torch.stack([loss.double() * n, (c > r).sum().double(), (c - r).sum(), c.sum(), r.sum(), n])
        self.engine.train()
        loss_sum, correct, margin, chosen, rejected, n = dist.all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        return {"dpo_loss": loss_sum / n, "reward_accuracy": correct / n, "reward_margin": margin / n,
                "chosen_reward": chosen / n, "rejected_reward": rejected / n, "eval_pairs": int(n)}

    def evaluate(self, when: str) -> dict:
        """Eval-split DPO metrics, the training batches' since the last eval and, on the builtin task, the judge."""
        metrics = self._eval_pairs()
        trained = dist.all_reduce_sum(self.train_sums.to(self.dev)).tolist()
        if trained[2] > 0:
            metrics |= {"train_accuracy": trained[0] / trained[2], "train_margin": trained[1] / trained[2]}
        self.train_sums.zero_()
        return self.record(metrics | self.judge(), when)

    def save(self) -> None:
        """The DPO policy as a plain HF causal-LM directory in --output_dir, with its eval history."""
        self.save_model(2)

    def summary(self) -> str:
        """Final lines: implicit-reward accuracy and margin, and the judge, before and after training."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 2 (DPO, {self.args.loss_type}, beta {self.args.beta:g}) done in "
                 f"{time.time() - self.start:.0f}s: reward accuracy {first['reward_accuracy']:.4f} -> "
                 f"{last['reward_accuracy']:.4f}, margin {first['reward_margin']:.4f} -> "
                 f"{last['reward_margin']:.4f} on {last['eval_pairs']} eval pairs"]
        if "judge" in last:
            lines.append(f"judge score on {len(self.prompts)} held-out prompts: start {first['judge']:.3f}, "
                         f"DPO {last['judge']:.3f}")
        if self.args.output_dir:
            lines.append(f"model saved to {self.args.output_dir}")
        return "\n".join(lines)
