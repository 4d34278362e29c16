"""Token rewards and advantage estimators: a registry of pure functions over [B, T] tensors.

Tensors are aligned on answer tokens ("actions"): column t holds the t-th answer token's quantities;
`action_mask` is 1 on valid answer tokens (through the first EOS). Step 3 picks an estimator by name
(`--advantage_estimator`); whether it needs a critic (values) decides whether step 3 builds one.
Adding an estimator is one function plus `@register_estimator(...)` above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dschat.algos.kl import kl_penalty
from dschat.algos.masked import as_float_mask, last_valid_index


@dataclass
class AdvantageInputs:
    """What an estimator may use: token rewards [B, T] (score + KL penalty), action mask [B, T], values
    [B, T] (None without a critic), clipped scores [B], group [B] (which prompt a sample answers), gamma, lam."""

    rewards: Tensor
    action_mask: Tensor
    scores: Tensor
    group: Tensor
    values: Tensor | None = None
    gamma: float = 1.0
    lam: float = 0.95


EstimatorFn = Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator: fn(inputs) -> (advantages [B, T], returns [B, T] or None)."""

    name: str
    fn: EstimatorFn
    needs_critic: bool
    whiten: bool  # advantages whitened over the whole rollout (all batches, all ranks) afterwards


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_estimator(name: str, *, needs_critic: bool, whiten: bool) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator that registers an estimator under `name` (the `--advantage_estimator` value)."""
    def wrap(fn: EstimatorFn) -> EstimatorFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, whiten)
        return fn
    return wrap


def get_estimator(name: str) -> AdvantageEstimator:
    """The registered estimator called `name` (ValueError listing the valid names otherwise)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid choices: {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def compute_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    action_mask: Tensor,
    scores: Tensor,
    kl_coef: float,
    clip_reward_value: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Token rewards [B, T] = -kl_coef * KL, masked, plus clipped scores [B] at each row's last valid action.

    Returns (rewards, kl), both [B, T] and 0 where action_mask is 0; empty rows get no score.
    """
    mask = as_float_mask(action_mask, logprobs.float())
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last, has_any = last_valid_index(mask)
    score = scores.to(rewards).clamp(-clip_reward_value, clip_reward_value) * has_any
    rewards = rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))
    return rewards, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over [B, T] rewards/values where action_mask [B, T] is 1 on answer tokens; returns (advantages, returns).

    V_{t+1} is taken as 0 past each row's last valid token; both outputs are 0 where the mask is 0.
    """
    mask = as_float_mask(action_mask, rewards.float())
    rewards = rewards.float() * mask
    values = values.float() * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # multiplying by the mask resets the recursion at masked positions, so rows that end
        # early never leak advantage from padding back into their last valid token
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


@register_estimator("gae", needs_critic=True, whiten=True)
def _gae(inp: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GAE (PPO with a critic): advantages and value targets from token rewards and values."""
    return gae_advantages(inp.rewards, inp.values, inp.action_mask, inp.gamma, inp.lam)
