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
    needs_group: bool = False  # compares samples of one prompt: needs --n_samples_per_prompt >= 2


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_estimator(name: str, *, needs_critic: bool, whiten: bool,
                       needs_group: bool = False) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator that registers an estimator under `name` (the `--advantage_estimator` value)."""
    def wrap(fn: EstimatorFn) -> EstimatorFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, fn, needs_critic, whiten, needs_group)
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


def group_stats(x: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (mean, unbiased std, size) of x [B] over the rows that share its `group` id [B]."""
    _, inverse = torch.unique(group, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1
    x = x.float()
    size = torch.zeros(n_groups, device=x.device).index_add_(0, inverse, torch.ones_like(x))
    mean = torch.zeros(n_groups, device=x.device).index_add_(0, inverse, x) / size
    ssd = torch.zeros(n_groups, device=x.device).index_add_(0, inverse, (x - mean[inverse]).square())
    std = (ssd / (size - 1).clamp(min=1)).sqrt()
    return mean[inverse], std[inverse], size[inverse]


def sequence_returns(rewards: Tensor, action_mask: Tensor) -> Tensor:
    """[B] undiscounted return of each answer: its score plus its (negative) KL penalty, summed over tokens."""
    return (rewards.float() * as_float_mask(action_mask, rewards.float())).sum(1)


def discounted_returns(rewards: Tensor, action_mask: Tensor, gamma: float) -> Tensor:
    """Token returns G_t = r_t + gamma * G_{t+1} [B, T] within each row's valid tokens; 0 where masked."""
    mask = as_float_mask(action_mask, rewards.float())
    rewards = rewards.float() * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def grpo_advantages(rewards: Tensor, action_mask: Tensor, scores: Tensor, group: Tensor, eps: float = 1e-6,
                    scale: bool = True) -> Tensor:
    """GRPO: the score normalised in its prompt's group, (s - group mean) / (group std + eps), on every valid token,
    plus the KL penalty still to come in that answer (sum over t' >= t of the token rewards besides the score) [B, T].

    Only the scores are normalised: dividing the KL penalty by the group's std (as normalising whole returns
    does) would scale --kl_ctl by 1 / std, a far stronger pull to the reference in groups that score alike.
    With --use_kl_loss the token rewards are the score alone and this is GRPO's usual advantage. scale=False
    (Dr. GRPO) only subtracts the group's mean.
    """
    mask = as_float_mask(action_mask, rewards.float())
    last, has_any = last_valid_index(mask)
    score = scores.float() * has_any  # the score compute_rewards put at each answer's last token (none if empty)
    penalty = rewards.float().scatter_add(1, last.unsqueeze(1), -score.unsqueeze(1))
    mean, std, _ = group_stats(score, group)
    normalised = (score - mean) / (std + eps) if scale else score - mean
    return normalised.unsqueeze(1) * mask + discounted_returns(penalty, mask, 1.0)


def rloo_advantages(rewards: Tensor, action_mask: Tensor, group: Tensor) -> Tensor:
    """RLOO: R minus the mean return of the other samples of the same prompt, on every valid token [B, T]."""
    ret = sequence_returns(rewards, action_mask)
    mean, _, size = group_stats(ret, group)
    others = (mean * size - ret) / (size - 1).clamp(min=1)
    return (ret - others).unsqueeze(1) * as_float_mask(action_mask, ret)


def subtract_group_baseline(rewards: Tensor, action_mask: Tensor, scores: Tensor, group: Tensor) -> Tensor:
    """Token rewards [B, T] whose end score has the mean score of its prompt's group subtracted."""
    mean, _, _ = group_stats(scores, group)
    last, has_any = last_valid_index(action_mask)
    return rewards.float().scatter_add(1, last.unsqueeze(1), (-mean * has_any).unsqueeze(1))


@register_estimator("grpo", needs_critic=False, whiten=False, needs_group=True)
def _grpo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """GRPO (Shao et al. 2024): group-normalised scores (plus the KL penalty to come, unnormalised), no critic."""
    return grpo_advantages(inp.rewards, inp.action_mask, inp.scores, inp.group), None


@register_estimator("dr_grpo", needs_critic=False, whiten=False, needs_group=True)
def _dr_grpo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """Dr. GRPO (Liu et al. 2025): the score minus its group's mean, no division by the group's std (plus the KL
    penalty to come, unnormalised, as in grpo)."""
    return grpo_advantages(inp.rewards, inp.action_mask, inp.scores, inp.group, scale=False), None


def groups_with_variance(scores: Tensor, group: Tensor) -> Tensor:
    """Bool [B]: rows whose prompt's group [B] has scores [B] that differ (a group all right or all wrong gives a
    group-relative estimator no gradient; --dynamic_sampling drops it)."""
    _, inverse = torch.unique(group, return_inverse=True)
    n = int(inverse.max().item()) + 1 if inverse.numel() else 0
    x = scores.float()
    high = torch.full((n,), -float("inf"), device=x.device).scatter_reduce(0, inverse, x, "amax")
    low = torch.full((n,), float("inf"), device=x.device).scatter_reduce(0, inverse, x, "amin")
    return (high > low)[inverse]


@register_estimator("rloo", needs_critic=False, whiten=False, needs_group=True)
def _rloo(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline over the prompt's samples, no critic."""
    return rloo_advantages(inp.rewards, inp.action_mask, inp.group), None


@register_estimator("reinforce_pp", needs_critic=False, whiten=True)
def _reinforce_pp(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """REINFORCE++ (Hu 2025): discounted token returns of KL-shaped rewards, whitened over the batch."""
    return discounted_returns(inp.rewards, inp.action_mask, inp.gamma), None


@register_estimator("reinforce_pp_baseline", needs_critic=False, whiten=True, needs_group=True)
def _reinforce_pp_baseline(inp: AdvantageInputs) -> tuple[Tensor, None]:
    """REINFORCE++ with baseline: the group's mean score subtracted first, then as reinforce_pp."""
    rewards = subtract_group_baseline(inp.rewards, inp.action_mask, inp.scores, inp.group)
    return discounted_returns(rewards, inp.action_mask, inp.gamma), None
