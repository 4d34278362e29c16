"""PPO on the RLHF engine: make experience from prompts, then clipped policy and value updates.

Tensors of an experience are aligned on answer tokens ("actions"): column t is the t-th answer token,
its log-prob under actor/ref, the critic's value of the state before it, its reward and advantage.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from dschat.rlhf import ppo_math
from dschat.rlhf.hybrid import Generator
from dschat.rlhf.kl_controller import make_kl_controller
from dschat.rlhf.rlhf_engine import RLHFEngine
from dschat.utils import dist
from dschat.utils.model.reward_model import end_scores, token_values


def answer_logits(model, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits [B, A, V] that predict the answer tokens seq[:, P:]."""
    return model(input_ids=seq, attention_mask=attention_mask, use_cache=False).logits[:, prompt_len - 1: -1]


def answer_logprobs(model, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, A] of the answer tokens seq[:, P:] under `model` (and their entropies if asked)."""
    logits = answer_logits(model, seq, attention_mask, prompt_len)
    logprobs = ppo_math.logprobs_from_logits(logits, seq[:, prompt_len:])
    return logprobs, (ppo_math.entropy_from_logits(logits) if with_entropy else None)


class PPOTrainer:
    """Experience generation and PPO updates for one RLHFEngine."""

    def __init__(self, engine: RLHFEngine, args: argparse.Namespace):
        self.engine, self.args = engine, args
        self.tokenizer = engine.tokenizer
        self.generator = Generator(engine.actor, self.tokenizer, args.enable_hybrid_engine, args.actor_zero_stage,
                                   args.release_inference_cache)
        self.kl_ctl = make_kl_controller(args.kl_ctl, args.target_kl, args.kl_horizon)
        self.sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": 0,
                         "max_new_tokens": args.max_answer_seq_len}

    def _score(self, seq: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model score at each sequence's last token, normalised with step 2's stats if asked."""
        scores = end_scores(token_values(self.engine.reward, seq, attention_mask), attention_mask).float()
        stats = self.engine.reward_stats
        if self.args.normalize_reward and stats:
            scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
        return scores

    @torch.no_grad()
    def generate_experience(self, prompt: torch.Tensor, prompt_mask: torch.Tensor) -> dict[str, Any]:
        """Sample answers and record everything PPO needs (old log-probs, ref log-probs, values, scores)."""
        start = time.time()
        seq = self.generator.generate(prompt, prompt_mask, **self.sampling)
        gen_time = time.time() - start
        p = prompt.shape[1]
        answer = seq[:, p:]
        action_mask = ppo_math.action_mask_from_tokens(answer, self.tokenizer.eos_token_id,
                                                       self.tokenizer.pad_token_id)
        # Tokens after the first EOS are padding: neither actions nor attended to.
        seq = torch.cat([prompt, torch.where(action_mask.bool(), answer, self.tokenizer.pad_token_id)], dim=1)
        attention_mask = torch.cat([prompt_mask, action_mask.long()], dim=1)
        e = self.engine
        e.actor.eval()
        logprobs, _ = answer_logprobs(e.actor, seq, attention_mask, p)
        ref_logprobs, _ = answer_logprobs(e.ref, seq, attention_mask, p)
        values = token_values(e.critic, seq, attention_mask)[:, p - 1: -1].float()
        scores = self._score(seq, attention_mask)
        e.actor.train()
        return {"seq": seq, "attention_mask": attention_mask, "prompt_len": p, "action_mask": action_mask,
                "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores,
                "experience_time": time.time() - start, "gen_time": gen_time}

    @torch.no_grad()
    def add_advantages(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Rewards (score + KL penalty), GAE, and advantages whitened over every batch on every rank."""
        a = self.args
        kl_sum, score_sum, n_seq = 0.0, 0.0, 0
        for exp in batches:
            rewards, kl = ppo_math.compute_rewards(exp["logprobs"], exp["ref_logprobs"], exp["action_mask"],
                                                   exp["scores"], self.kl_ctl.value, a.clip_reward_value,
                                                   a.kl_estimator)
            exp["advantages"], exp["returns"] = ppo_math.gae_advantages(rewards, exp["values"], exp["action_mask"],
                                                                        a.gamma, a.lam)
            kl_sum += ppo_math.masked_sum(kl, exp["action_mask"]).item()
            score_sum += exp["scores"].sum().item()
            n_seq += exp["scores"].numel()
        # Whitening over the whole rollout (all buffered batches, all ranks) rather than per micro-batch.
        flat_adv = torch.cat([exp["advantages"].flatten() for exp in batches])
        flat_mask = torch.cat([exp["action_mask"].flatten() for exp in batches])
        whitened = ppo_math.masked_whiten(flat_adv, flat_mask)
        offset = 0
        for exp in batches:
            n = exp["advantages"].numel()
            exp["advantages"] = whitened[offset: offset + n].view_as(exp["advantages"])
            offset += n
        totals = dist.all_reduce_sum(torch.tensor([kl_sum, score_sum, n_seq], dtype=torch.float64))
        kl_mean = (totals[0] / totals[2]).item()
        self.kl_ctl.update(kl_mean, int(totals[2].item()))
        return {"kl": kl_mean, "reward_score": (totals[1] / totals[2]).item(), "kl_coef": self.kl_ctl.value}

    def train_rlhf(self, exp: dict[str, Any]) -> dict[str, float]:
        """One PPO update of actor then critic on a micro-batch of experience."""
        a, e = self.args, self.engine
        mask, p = exp["action_mask"], exp["prompt_len"]
        # Normalise by the global token count so the loss does not depend on how the batch is sharded.
        tokens = dist.all_reduce_sum(mask.sum().double().reshape(1)).item() / dist.world_size()
        logprobs, entropy = answer_logprobs(e.actor, exp["seq"], exp["attention_mask"], p, a.entropy_coef > 0)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, exp["logprobs"], exp["advantages"], mask, a.cliprange,
                                                 token_count=tokens)
        actor_loss = pg_loss
        if entropy is not None:
            actor_loss = actor_loss - a.entropy_coef * ppo_math.masked_sum(entropy, mask) / tokens
        e.actor.backward(actor_loss)
        e.actor.step()
        values = token_values(e.critic, exp["seq"], exp["attention_mask"])[:, p - 1: -1].float()
        vf_loss, vf_stats = ppo_math.value_loss(values, exp["values"], exp["returns"], mask, a.cliprange_value,
                                                token_count=tokens)
        e.critic.backward(vf_loss)
        e.critic.step()
        stats = {"actor_loss": pg_loss.item(), "critic_loss": vf_loss.item(), **pg_stats, **vf_stats}
        if entropy is not None:
            stats["entropy"] = ppo_math.masked_mean(entropy.detach(), mask).item()
        return {k: float(v) for k, v in stats.items()}

    def train_unsupervised(self, batch: dict[str, torch.Tensor]) -> float:
        """PTX: language-model loss on unsupervised text, scaled by --unsup_coef."""
        loss = self.engine.actor(**batch, use_cache=False).loss * self.args.unsup_coef
        self.engine.actor.backward(loss)
        self.engine.actor.step()
        return loss.item()
