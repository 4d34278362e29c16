"""Pure tensor functions for PPO-based RLHF.

All [B, T] tensors are aligned on action positions: position t holds quantities for the
answer token generated at step t. ``action_mask`` is 1 on valid answer tokens (through and
including the first EOS) and 0 afterwards; masks may be bool or float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)


def action_mask_from_tokens(answer_ids: Tensor, eos_token_id: int, pad_token_id: int) -> Tensor:
    """Float [B, T] mask for answer_ids [B, T]: 1 at positions <= first EOS (all positions if no EOS).

    When pad differs from EOS, positions from the first pad token onward are also 0 (a row cut off
    before any EOS can still be right-padded). When pad == EOS only the first EOS rule applies, so a
    pad-as-EOS token still counts as the terminating action.
    """
    B, T = answer_ids.shape
    pos = torch.arange(T, device=answer_ids.device).expand(B, T)
    no_end = torch.full((B,), T, dtype=torch.long, device=answer_ids.device)

    is_eos = answer_ids == eos_token_id
    # argmax returns the first maximal index, i.e. the first EOS
    end = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, no_end)
    if pad_token_id != eos_token_id:
        is_pad = answer_ids == pad_token_id
        first_pad = torch.where(is_pad.any(dim=1), is_pad.long().argmax(dim=1), no_end)
        end = torch.minimum(end, first_pad)
    return (pos < end.unsqueeze(1)).float()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x * mask (same shapes) over dim, or over everything when dim is None."""
    m = _as_float_mask(mask, x)
    return (x * m).sum() if dim is None else (x * m).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask (same shape) is 1; 0 (not NaN) where no entry is valid."""
    m = _as_float_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1.0)


def _kl_k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _kl_k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: Tensor) -> Tensor:
    # (p_ref/p - 1) - log(p_ref/p): unbiased and always >= 0 under samples from the actor
    return torch.expm1(-log_ratio) + log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token [B, T] estimate of KL(actor || ref) from actor samples (Schulman k1/k2/k3); unmasked."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid choices: {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs.float() - ref_logprobs.float())


def _last_valid_index(action_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index [B] of the last 1 in action_mask [B, T] (0 for empty rows) and a bool [B] 'row has any'."""
    valid = action_mask.bool()
    T = valid.shape[1]
    pos = torch.arange(1, T + 1, device=valid.device).expand_as(valid)
    last = (pos * valid).max(dim=1).values - 1
    return last.clamp(min=0), valid.any(dim=1)


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
    mask = _as_float_mask(action_mask, logprobs.float())
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask
    rewards = -kl_coef * kl
    last, has_any = _last_valid_index(mask)
    score = scores.to(rewards).clamp(-clip_reward_value, clip_reward_value) * has_any
    rewards = rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))
    return rewards, kl


def gae_advantages(
    rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over [B, T] rewards/values where action_mask [B, T] is 1 on answer tokens; returns (advantages, returns).

    V_{t+1} is taken as 0 past each row's last valid token; both outputs are 0 where the mask is 0.
    """
    mask = _as_float_mask(action_mask, rewards.float())
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


def _all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Whiten x [B, T] over valid (mask==1) entries of the whole rollout on all ranks in group; 0 where masked.

    Uses the unbiased variance (like torch.var) when the global count is > 1. With shift_mean=False the
    global mean is added back (only the scale changes).
    """
    xf = x.float()
    m = _as_float_mask(mask, xf)
    stats = torch.stack([(xf * m).sum(), m.sum()])
    total, count = _all_reduce_sum(stats, group).unbind()
    mean = total / count.clamp(min=1.0)
    # a second pass over squared deviations avoids the cancellation of E[x^2] - E[x]^2
    ssd = _all_reduce_sum(((xf - mean).square() * m).sum(), group)
    # torch.where instead of a python branch keeps this free of a device->host sync
    var = torch.where(count > 1, ssd / (count - 1.0).clamp(min=1.0), torch.zeros_like(ssd))
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    cliprange: float,
    token_count: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate over [B, T] masked tokens; returns (scalar loss, {"clipfrac", "approx_kl"}).

    The loss is divided by token_count when given (e.g. a global count, so it is independent of
    sharding), else by the local sum(mask); stats are local masked means, detached.
    """
    mask = _as_float_mask(action_mask, logprobs.float())
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    denom = mask.sum().clamp(min=1.0) if token_count is None else token_count
    loss = masked_sum(torch.maximum(unclipped, clipped), mask) / denom
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    cliprange_value: float,
    token_count: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5*max((v-R)^2, (clip(v)-R)^2) over [B, T] masked tokens; returns (loss, {"vf_clipfrac"}).

    Normalised by token_count when given, else by the local sum(mask).
    """
    mask = _as_float_mask(action_mask, values.float())
    v = values.float()
    old = old_values.float()
    ret = returns.float()
    v_clipped = torch.clamp(v, old - cliprange_value, old + cliprange_value)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    denom = mask.sum().clamp(min=1.0) if token_count is None else token_count
    loss = 0.5 * masked_sum(torch.maximum(err_unclipped, err_clipped), mask) / denom
    with torch.no_grad():
        vf_clipfrac = masked_mean((err_clipped > err_unclipped).float(), mask)
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy [B, T] of the categorical given by logits [B, T, V] (computed in float32)."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    # where p == 0 (e.g. -inf logits) the term is 0, but 0 * -inf would be NaN
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob [B, T] of labels [B, T] under logits [B, T, V] (computed in float32)."""
    logits = logits.float()
    # gather - logsumexp avoids materialising a second full [B, T, V] log_softmax tensor
    picked = logits.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def exact_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact per-position KL(actor || ref) over the vocabulary from [B, T, V] logits; returns [B, T] (>= 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)
