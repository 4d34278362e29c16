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
from dschat.algos.losses import entropy_from_logits, logprobs_from_logits, value_loss
from dschat.algos.masked import agg_count, aggregate, masked_mean, masked_sum, masked_whiten, truncated_rows
from dschat.algos.policy_losses import PolicyLossConfig, get_policy_loss
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
    cliprange_high: float | None = None  # None: = cliprange
    dual_clip: float | None = None
    policy_loss: str = "ppo"
    loss_agg_mode: str = "token-mean"
    mask_truncated_completions: bool = False
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    entropy_coef: float = 0.0
    entropy_target: float | None = None
    entropy_coef_delta: float = 0.005
    unsup_coef: float = 27.8
    temperature: float = 1.0
    top_p: float = 1.0
    max_answer_seq_len: int = 64
    logprobs_from_generation: bool = False
    padding_free: bool = False
    reuse_critic_forward: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, reuse_critic_forward: bool = False) -> PPOSettings:
        """The settings from step 3's flags (same names); the last one is derived by the caller."""
        names = [f for f in cls.__dataclass_fields__ if f != "reuse_critic_forward"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)},
                   reuse_critic_forward=reuse_critic_forward)


def answer_logprobs(model, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    with_entropy: bool = False, temperature: float = 1.0,
                    entropy_grad: bool = True, padding_free: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, A] of the answer tokens seq[:, P:] under `model`'s logits / temperature (and their entropies if
    asked), always from fp32 logits: old, new and reference log-probs must be one function, or a bf16 model's
    ratios start off 1; at the sampling temperature, so that they are the log-probs of the policy that sampled.
    entropy_grad=False computes the entropies without a graph (when only logged); padding_free: the rows run packed
    (dschat.models.forward.answer_logits)."""
    logits = answer_logits(model, seq, attention_mask, prompt_len, padding_free).float()
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logprobs_from_logits(logits, seq[:, prompt_len:], upcast=True)
    if not with_entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logits(logits, upcast=True)
    return logprobs, entropy


def answer_values(critic, seq: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  padding_free: bool = False) -> torch.Tensor:
    """The critic's values [B, A] of the states before each answer token (0 where the next token is padding when
    `padding_free`)."""
    return token_values(critic, seq, attention_mask, padding_free=padding_free)[:, prompt_len - 1: -1].float()


def reward_sum_count(values: list[float | None]) -> tuple[float, float]:
    """(sum, count) of the values a reward gave (None: no opinion, left out of both)."""
    seen = [v for v in values if v is not None]
    return float(sum(seen)), float(len(seen))


class PPOTrainer:
    """Experience generation and PPO updates for one RLHFEngine."""

    def __init__(self, engine: RLHFEngine, settings: PPOSettings, generator: Generator, rewards: RewardSet):
        self.engine, self.s, self.generator, self.rewards = engine, settings, generator, rewards
        self.estimator = get_estimator(settings.advantage_estimator)
        self.policy_loss = get_policy_loss(settings.policy_loss)
        self.loss_config = PolicyLossConfig(settings.cliprange, settings.cliprange_high, settings.dual_clip)
        self.entropy_coef = settings.entropy_coef  # adapted toward --entropy_target when one is set
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
            logprobs, _ = answer_logprobs(e.actor, seq, attention_mask, p, temperature=self.s.temperature,
                                          padding_free=self.s.padding_free)
            e.actor.train()
        ref_logprobs, _ = answer_logprobs(e.ref, seq, attention_mask, p, temperature=self.s.temperature,
                                          padding_free=self.s.padding_free)
        values, live_values = None, None
        if e.critic is not None and self.s.reuse_critic_forward:
            # The update's one critic forward, run now with its graph kept: its detached values are the old
            # values (train mode equals eval mode: the critic has no dropout), so no second forward is needed.
            with torch.enable_grad():
                live_values = answer_values(e.critic, seq, attention_mask, p, self.s.padding_free)
            values = live_values.detach()
        elif e.critic is not None:  # old values in eval mode (no dropout), as the actor's old log-probs
            e.critic.eval()
            values = answer_values(e.critic, seq, attention_mask, p, self.s.padding_free)
            e.critic.train()
        rewards = self.score(rollout, prompt_text, fields)
        group = torch.arange(seq.shape[0], device=seq.device) // n  # which prompt of this batch a row answers
        loss_mask = rollout.action_mask
        if self.s.mask_truncated_completions:  # DAPO's overlong filtering: a cut answer carries no loss
            cut = truncated_rows(seq[:, p:], rollout.action_mask, self.generator.fmt.eos_token_id)
            loss_mask = rollout.action_mask * (~cut).unsqueeze(1).to(rollout.action_mask)
        return {"loss_mask": loss_mask, "seq": seq, "attention_mask": attention_mask, "prompt_len": p, "action_mask": rollout.action_mask,
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
        mask, p = exp.get("loss_mask", exp["action_mask"]), exp["prompt_len"]
        # Normalise by the global count (tokens, or answers) so the loss does not depend on how the batch is sharded.
        count = dist.all_reduce_sum(agg_count(mask, s.loss_agg_mode).double().reshape(1)).item() / dist.world_size()
        adaptive = self.entropy_coef > 0 or s.entropy_target is not None
        logprobs, entropy = answer_logprobs(e.actor, exp["seq"], exp["attention_mask"], p, True, s.temperature,
                                            entropy_grad=adaptive, padding_free=s.padding_free)
        per_token, stats = self.policy_loss(logprobs, exp["logprobs"], exp["advantages"], mask, self.loss_config)
        pg_loss = self.aggregate(per_token, mask, count)
        actor_loss = pg_loss
        if self.entropy_coef > 0:
            actor_loss = actor_loss - self.aggregate(entropy, mask, count, weight=self.entropy_coef)
        if s.use_kl_loss:
            kl_loss = self.aggregate(kl_penalty(logprobs, exp["ref_logprobs"], s.kl_estimator), mask, count)
            actor_loss = actor_loss + self.kl_ctl.value * kl_loss
            stats["kl_loss"] = kl_loss.detach()
        losses = [actor_loss]
        if e.critic is not None:
            values = exp.get("live_values")
            if values is None:
                values = answer_values(e.critic, exp["seq"], exp["attention_mask"], p, s.padding_free)
            vf_loss, vf_stats = value_loss(values, exp["values"], exp["returns"], mask, s.cliprange_value,
                                           token_count=self.value_token_count(mask, count))
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
        stats["entropy"] = masked_mean(entropy.detach(), mask)  # the policy's mean token entropy, every step
        return {k: float(v) for k, v in stats.items()}

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, count: float, weight: float = 1.0) -> torch.Tensor:
        """A per-token loss term reduced by --loss_agg_mode over the global batch (count: this rank's share)."""
        return aggregate(per_token, mask, self.s.loss_agg_mode, count, self.s.max_answer_seq_len, weight)

    def value_token_count(self, mask: torch.Tensor, count: float) -> float:
        """The critic's loss is a token mean whatever --loss_agg_mode says: this rank's share of the global tokens
        (`count` already is that under token-mean)."""
        if self.s.loss_agg_mode == "token-mean":
            return count
        return dist.all_reduce_sum(mask.sum().double().reshape(1)).item() / dist.world_size()

    def adapt_entropy_coef(self, entropy: float) -> float:
        """--entropy_target: raise the entropy coefficient by --entropy_coef_delta when the step's entropy is below
        the target, lower it above, clipped to [0, 1]; returns the new value (the same on every rank)."""
        if self.s.entropy_target is not None:
            step = self.s.entropy_coef_delta if entropy < self.s.entropy_target else -self.s.entropy_coef_delta
            self.entropy_coef = min(1.0, max(0.0, self.entropy_coef + step))
        return self.entropy_coef

    def train_unsupervised(self, batch: dict[str, torch.Tensor], guard: NanGuard) -> float | None:
        """PTX: language-model loss on unsupervised text, scaled by --unsup_coef (None when non-finite)."""
        loss = self.engine.actor(**batch, use_cache=False).loss * self.s.unsup_coef
        if not guard.ok(loss):
            return None
        self.engine.actor.backward(loss)
        self.engine.actor.step()
        return loss.item()


def select_rows(exp: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The experience of the rows where `keep` [B] (bool) is True: every per-row tensor and reward list cut alike."""
    n = exp["seq"].shape[0]
    idx = keep.nonzero().flatten()
    rows = idx.tolist()
    out = {}
    for k, v in exp.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            out[k] = v[idx.to(v.device)]
        elif k == "reward_values":
            out[k] = {name: [values[i] for i in rows] for name, values in v.items()}
        else:
            out[k] = v
    return out


def merge_experiences(exps: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One experience batch from several (before advantages): prompts left-padded to the longest prompt, answers
    right-padded to the longest answer (pads attend to nothing and are no actions), group ids kept apart."""
    if any(e.get("live_values") is not None for e in exps):
        raise ValueError("merge_experiences: an experience with a live critic graph cannot be merged")
    P = max(e["prompt_len"] for e in exps)
    A = max(e["action_mask"].shape[1] for e in exps)
    parts: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for e in exps:
        p, a = e["prompt_len"], e["action_mask"].shape[1]
        pad = (P - p, A - a)  # left of the prompt, right of the answer
        seq = torch.nn.functional.pad(e["seq"], pad, value=pad_token_id)
        attention = torch.nn.functional.pad(e["attention_mask"], pad, value=0)
        parts.setdefault("seq", []).append(seq)
        parts.setdefault("attention_mask", []).append(attention)
        for k in ("action_mask", "loss_mask", "logprobs", "ref_logprobs", "values"):
            if e.get(k) is not None:
                parts.setdefault(k, []).append(torch.nn.functional.pad(e[k], (0, A - a), value=0))
        parts.setdefault("scores", []).append(e["scores"])
        parts.setdefault("group", []).append(e["group"] + offset)
        offset += int(e["group"].max().item()) + 1 if e["group"].numel() else 0
    out: dict[str, Any] = {k: torch.cat(v) for k, v in parts.items()}
    out.setdefault("values", None)
    out |= {"prompt_len": P, "live_values": None,
            "reward_values": {name: [x for e in exps for x in e["reward_values"][name]]
                              for name in exps[0]["reward_values"]},
            "experience_time": sum(e["experience_time"] for e in exps), "gen_time": sum(e["gen_time"] for e in exps)}
    return out
