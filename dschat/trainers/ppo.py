"""PPO on the RLHF engine: make experience from prompts, then clipped policy (and value) updates.

Tensors of an experience are aligned on answer tokens ("actions"): column t is the t-th answer token,
its log-prob under actor/ref, the critic's value of the state before it, its reward and advantage.
Advantages come from the estimator named by --advantage_estimator (`dschat.algos.advantages`); the
critic exists only when that estimator needs values.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch

from dschat.algos.advantages import AdvantageInputs, compute_rewards, get_estimator
from dschat.algos.kl import kl_penalty, make_kl_controller
from dschat.algos.losses import entropy_from_logits, logprobs_from_logits, policy_loss, value_loss
from dschat.algos.masked import masked_mean, masked_sum, masked_whiten
from dschat.models.forward import answer_logits
from dschat.models.heads import token_values
from dschat.rewards.combine import RewardBatch, RewardResult, RewardSet
from dschat.runtime import dist
from dschat.trainers.loop import NanGuard
from dschat.trainers.rlhf_engine import RLHFEngine
from dschat.trainers.rollout import Generator, Rollout, decode_answers


@dataclass(frozen=True)
class PPOSettings:
    """Step 3's algorithm settings (DeepSpeed-Chat hard-codes most of them)."""

    advantage_estimator: str = "gae"
    n_samples_per_prompt: int = 1
    kl_ctl: float = 0.1
    target_kl: float | None = None
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    use_kl_loss: bool = False
    clip_reward_value: float = 5.0
    normalize_reward: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0
    unsup_coef: float = 27.8
    temperature: float = 1.0
    top_p: float = 1.0
    max_answer_seq_len: int = 64
    logprobs_from_generation: bool = False
    reuse_critic_forward: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, reuse_critic_forward: bool = False) -> PPOSettings:
        """The settings from step 3's flags (same names); the last one is derived by the caller."""
        names = [f for f in cls.__dataclass_fields__ if f != "reuse_critic_forward"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)},
                   reuse_critic_forward=reuse_critic_forward)


def answer_logprobs(model, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    with_entropy: bool = False, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, A] of the answer tokens seq[:, P:] under `model`'s logits / temperature (and their entropies if
    asked), always from fp32 logits: old, new and reference log-probs must be one function, or a bf16 model's
    ratios start off 1; at the sampling temperature, so that they are the log-probs of the policy that sampled."""
    logits = answer_logits(model, seq, attention_mask, prompt_len).float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, seq[:, prompt_len:], upcast=True)
    return logprobs, (entropy_from_logits(logits, upcast=True) if with_entropy else None)


def answer_values(critic, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The critic's values [B, A] of the states before each answer token."""
    return token_values(critic, seq, attention_mask)[:, prompt_len - 1: -1].float()


def reward_sum_count(values: list[float | None]) -> tuple[float, float]:
    """(sum, count) of the values a reward gave (None: no opinion, left out of both)."""
    seen = [v for v in values if v is not None]
    return float(sum(seen)), float(len(seen))


class PPOTrainer:
    """Experience generation and PPO updates for one RLHFEngine."""

    def __init__(self, engine: RLHFEngine, settings: PPOSettings, generator: Generator, rewards: RewardSet):
        self.engine, self.s, self.generator, self.rewards = engine, settings, generator, rewards
        self.estimator = get_estimator(settings.advantage_estimator)
        self.kl_ctl = make_kl_controller(settings.kl_ctl, settings.target_kl, settings.kl_horizon)
        self.sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                         "top_k": 0, "max_new_tokens": settings.max_answer_seq_len}

    def score(self, rollout: Rollout, prompt_text: list[Any] | None, fields: list[dict[str, Any]] | None
              ) -> RewardResult:
        """Every --reward_fn reward of a rollout's answers (decoded only when a reward reads text)."""
        n = rollout.seq.shape[0]
        answers = rollout.seq[:, rollout.prompt_len:]
        ids = [row[mask.bool()].tolist() for row, mask in zip(answers, rollout.action_mask)]
        prompts = list(prompt_text) if prompt_text is not None else [None] * n
        completions: list[Any] = [None] * n
        if self.rewards.needs_text:
            texts = decode_answers(self.generator.fmt, rollout)
            # TRL's convention: conversational prompts (message lists) get conversational completions.
            completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                           for p, t in zip(prompts, texts)]
        batch = RewardBatch(prompts, completions, ids, list(fields) if fields is not None else [{}] * n,
                            rollout.seq, rollout.attention_mask)
        return self.rewards(batch)

    @torch.no_grad()
    def generate_experience(self, prompt: torch.Tensor, prompt_mask: torch.Tensor,
                            prompt_text: list[Any] | None = None,
                            fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Sample --n_samples_per_prompt answers per prompt and record what PPO needs (log-probs, values, rewards);
        `prompt_text` and `fields` (the rows' other columns) reach the reward functions."""
        start = time.time()
        n = self.s.n_samples_per_prompt
        if n > 1:  # a prompt's samples sit next to each other, so a group never spans batches or ranks
            prompt, prompt_mask = prompt.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
            prompt_text = [t for t in prompt_text for _ in range(n)] if prompt_text is not None else None
            fields = [f for f in fields for _ in range(n)] if fields is not None else None
        from_sampling = self.s.logprobs_from_generation
        rollout = self.generator.generate(prompt, prompt_mask, with_logprobs=from_sampling, **self.sampling)
        gen_time = time.time() - start
        seq, attention_mask, p = rollout.seq, rollout.attention_mask, rollout.prompt_len
        e = self.engine
        # Every log-prob of step 3 is at the sampling temperature (logits / T): the policy PPO's ratios and the KL
        # talk about is the one that sampled the answers.
        if from_sampling:  # the sampling pass's logits: one actor forward fewer (equal up to float rounding)
            logprobs = rollout.logprobs
        else:
            e.actor.eval()
            logprobs, _ = answer_logprobs(e.actor, seq, attention_mask, p, temperature=self.s.temperature)
            e.actor.train()
        ref_logprobs, _ = answer_logprobs(e.ref, seq, attention_mask, p, temperature=self.s.temperature)
        values, live_values = None, None
        if e.critic is not None and self.s.reuse_critic_forward:
            # The update's one critic forward, run now with its graph kept: its detached values are the old
            # values (train mode equals eval mode: the critic has no dropout), so no second forward is needed.
            with torch.enable_grad():
                live_values = answer_values(e.critic, seq, attention_mask, p)
            values = live_values.detach()
        elif e.critic is not None:  # old values in eval mode (no dropout), as the actor's old log-probs
            e.critic.eval()
            values = answer_values(e.critic, seq, attention_mask, p)
            e.critic.train()
        rewards = self.score(rollout, prompt_text, fields)
        group = torch.arange(seq.shape[0], device=seq.device) // n  # which prompt of this batch a row answers
        return {"seq": seq, "attention_mask": attention_mask, "prompt_len": p, "action_mask": rollout.action_mask,
                "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "live_values": live_values,
                "scores": rewards.total.to(seq.device), "reward_values": rewards.values, "group": group,
                "experience_time": time.time() - start, "gen_time": gen_time}

    @torch.no_grad()
    def add_advantages(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Token rewards (score + KL penalty), the estimator's advantages, whitened over every batch and rank."""
        s = self.s
        names = self.rewards.names
        sums = torch.zeros(2 + 2 * len(names), dtype=torch.float64)  # KL, total reward, then (sum, count) per reward
        for exp in batches:
            kl_coef = 0.0 if s.use_kl_loss else self.kl_ctl.value  # KL in the reward or in the loss, not both
            rewards, kl = compute_rewards(exp["logprobs"], exp["ref_logprobs"], exp["action_mask"], exp["scores"],
                                          kl_coef, s.clip_reward_value, s.kl_estimator)
            inputs = AdvantageInputs(rewards=rewards, action_mask=exp["action_mask"],
                                     scores=exp["scores"].float().clamp(-s.clip_reward_value, s.clip_reward_value),
                                     group=exp["group"], values=exp["values"], gamma=s.gamma, lam=s.lam)
            exp["advantages"], exp["returns"] = self.estimator.fn(inputs)
            per_reward = [x for name in names for x in reward_sum_count(exp["reward_values"][name])]
            sums += torch.tensor([masked_sum(kl, exp["action_mask"]).item(), exp["scores"].double().sum().item(),
                                  *per_reward], dtype=torch.float64)
        n_seq_local = torch.tensor([float(sum(exp["scores"].numel() for exp in batches))], dtype=torch.float64)
        if self.estimator.whiten:  # over the whole rollout (all buffered batches, all ranks), not per micro-batch
            flat_adv = torch.cat([exp["advantages"].flatten() for exp in batches])
            flat_mask = torch.cat([exp["action_mask"].flatten() for exp in batches])
            whitened = masked_whiten(flat_adv, flat_mask, reduce_sum=dist.all_reduce_sum)
            offset = 0
            for exp in batches:
                n = exp["advantages"].numel()
                exp["advantages"] = whitened[offset: offset + n].view_as(exp["advantages"])
                offset += n
        totals = dist.all_reduce_sum(torch.cat([sums, n_seq_local])).tolist()
        kl_sum, total_sum, n_seq = totals[0], totals[1], totals[-1]
        self.kl_ctl.update(kl_sum / n_seq, int(n_seq))
        out = {"kl": kl_sum / n_seq, "reward_score": total_sum / n_seq, "kl_coef": self.kl_ctl.value}
        for i, name in enumerate(names):  # each reward's mean over the rows it had an opinion on
            value_sum, count = totals[2 + 2 * i], totals[3 + 2 * i]
            if count:
                out[f"reward/{name}"] = value_sum / count
        return out

    def train_rlhf(self, exp: dict[str, Any], guard: NanGuard) -> dict[str, float] | None:
        """One PPO update of the actor (and the critic) on a micro-batch; None when skipped as non-finite.

        Both losses are checked (on every rank) before any backward, so a NaN update is never applied, and
        actor and critic are skipped together.
        """
        s, e = self.s, self.engine
        mask, p = exp["action_mask"], exp["prompt_len"]
        # Normalise by the global token count so the loss does not depend on how the batch is sharded.
        tokens = dist.all_reduce_sum(mask.sum().double().reshape(1)).item() / dist.world_size()
        logprobs, entropy = answer_logprobs(e.actor, exp["seq"], exp["attention_mask"], p, s.entropy_coef > 0,
                                            s.temperature)
        pg_loss, stats = policy_loss(logprobs, exp["logprobs"], exp["advantages"], mask, s.cliprange,
                                     token_count=tokens)
        actor_loss = pg_loss
        if entropy is not None:
            actor_loss = actor_loss - s.entropy_coef * masked_sum(entropy, mask) / tokens
        if s.use_kl_loss:
            kl_loss = masked_sum(kl_penalty(logprobs, exp["ref_logprobs"], s.kl_estimator), mask) / tokens
            actor_loss = actor_loss + self.kl_ctl.value * kl_loss
            stats["kl_loss"] = kl_loss.detach()
        losses = [actor_loss]
        if e.critic is not None:
            values = exp.get("live_values")
            if values is None:
                values = answer_values(e.critic, exp["seq"], exp["attention_mask"], p)
            vf_loss, vf_stats = value_loss(values, exp["values"], exp["returns"], mask, s.cliprange_value,
                                           token_count=tokens)
            losses.append(vf_loss)
            stats |= vf_stats | {"critic_loss": vf_loss.detach()}
        if not guard.ok(*losses):
            return None
        e.actor.backward(actor_loss)
        e.actor.step()
        if e.critic is not None:
            e.critic.backward(losses[1])
            e.critic.step()
        stats["actor_loss"] = pg_loss.detach()
        if entropy is not None:
            stats["entropy"] = masked_mean(entropy.detach(), mask)
        return {k: float(v) for k, v in stats.items()}

    def train_unsupervised(self, batch: dict[str, torch.Tensor], guard: NanGuard) -> float | None:
        """PTX: language-model loss on unsupervised text, scaled by --unsup_coef (None when non-finite)."""
        loss = self.engine.actor(**batch, use_cache=False).loss * self.s.unsup_coef
        if not guard.ok(loss):
            return None
        self.engine.actor.backward(loss)
        self.engine.actor.step()
        return loss.item()
