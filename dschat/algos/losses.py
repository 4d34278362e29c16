"""Losses and per-token quantities from logits, as pure functions over tensors.

Policy and value losses work on [B, T] tensors aligned on answer tokens (see `dschat.algos.advantages`);
reward-model losses on end scores [B] or per-token values [B, L] of right-padded chosen/rejected pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dschat.algos.masked import as_float_mask, end_index, masked_mean, masked_sum


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    cliprange: float,
    token_count: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate over [B, T] masked tokens; returns (scalar loss, {"clipfrac", "approx_kl", "ratio_mean"}).

    Step 3 now takes its policy loss from the registry in `dschat.algos.policy_losses` (--policy_loss); this is the
    pre-registry loss, kept as the reference its default ppo entry is tested against bit for bit.

    The loss is divided by token_count when given (e.g. a global count, so it is independent of
    sharding), else by the local sum(mask); stats are local masked means, detached.
    """
    mask = as_float_mask(action_mask, logprobs.float())
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
        ratio_mean = masked_mean(ratio.detach(), mask)
    return loss, {"clipfrac": clipfrac, "approx_kl": approx_kl, "ratio_mean": ratio_mean}


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
    mask = as_float_mask(action_mask, values.float())
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


def entropy_from_logits(logits: Tensor, upcast: bool = True) -> Tensor:
    """Entropy [B, T] of the categorical given by logits [B, T, V] (in float32 unless upcast=False)."""
    logits = logits.float() if upcast else logits
    logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    # where p == 0 (e.g. -inf logits) the term is 0, but 0 * -inf would be NaN
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, labels: Tensor, upcast: bool = True) -> Tensor:
    """Log-prob [B, T] of labels [B, T] under logits [B, T, V] (in float32 unless upcast=False)."""
    logits = logits.float() if upcast else logits
    # gather - logsumexp avoids materialising a second full [B, T, V] log_softmax tensor
    picked = logits.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor,
                  margin: float | Tensor = 0.0) -> Tensor:
    """Bradley-Terry loss mean(-logsigmoid(chosen - rejected - margin)) on end scores (InstructGPT)."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float() - margin).mean()


def divergence_span(chosen_ids: Tensor, rejected_ids: Tensor, chosen_mask: Tensor,
                    rejected_mask: Tensor) -> Tensor:
    """[B, L] bool: DeepSpeed-Chat's loss positions, from the first differing token to the longer end.

    Expects right-padded pairs (as RewardCollator makes). Tokens are compared together with the mask, so
    a response that is a prefix of the other diverges where the shorter one ends. Identical pairs use
    only their last real token.
    """
    c_tok = chosen_ids.masked_fill(chosen_mask == 0, -1)
    r_tok = rejected_ids.masked_fill(rejected_mask == 0, -1)
    differs = c_tok != r_tok
    end = torch.maximum(end_index(chosen_mask), end_index(rejected_mask)) + 1  # exclusive
    start = torch.where(differs.any(-1), differs.int().argmax(-1), end - 1)
    positions = torch.arange(chosen_ids.shape[-1], device=chosen_ids.device)
    return (positions >= start.unsqueeze(1)) & (positions < end.unsqueeze(1))


def divergence_loss(chosen_values: Tensor, rejected_values: Tensor, chosen_ids: Tensor,
                    rejected_ids: Tensor, chosen_mask: Tensor,
                    rejected_mask: Tensor) -> Tensor:
    """DeepSpeed-Chat's loss: per pair, mean of -logsigmoid(c_t - r_t) over the divergent span; mean over pairs."""
    span = divergence_span(chosen_ids, rejected_ids, chosen_mask, rejected_mask).float()
    per_token = -F.logsigmoid(chosen_values.float() - rejected_values.float())
    return ((per_token * span).sum(-1) / span.sum(-1).clamp(min=1)).mean()


def pairwise_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Share of pairs whose chosen score is strictly higher than the rejected one."""
    return (chosen_scores > rejected_scores).float().mean()


def row_sums(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Per-row sums [n_rows] (float32) of flat per-token values [N] whose row indices are rows [N]."""
    out = torch.zeros(n_rows, dtype=torch.float32, device=values.device)
    return out.index_add(0, rows, values.float())


def sequence_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed log-probs [B] of label tokens [B, T] (-100 = masked) under logits [B, T, V], shifted next-token."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    picked = logprobs_from_logits(logits, labels.masked_fill(~mask, 0))
    return (picked * mask).sum(-1)


DPOLossFn = Callable[[Tensor, float], Tensor]
DPO_LOSSES: dict[str, DPOLossFn] = {}


def register_dpo_loss(name: str) -> Callable[[DPOLossFn], DPOLossFn]:
    """Decorator that registers fn(h [B], beta) -> scalar loss as DPO's `--loss_type name`, where h is the
    chosen-minus-rejected difference of the policy-to-reference log-ratios."""
    def wrap(fn: DPOLossFn) -> DPOLossFn:
        if name in DPO_LOSSES:
            raise ValueError(f"DPO loss {name!r} is registered twice")
        DPO_LOSSES[name] = fn
        return fn
    return wrap


@register_dpo_loss("sigmoid")
def dpo_sigmoid(h: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023): mean(-logsigmoid(beta * h))."""
    return -F.logsigmoid(beta * h).mean()


@register_dpo_loss("ipo")
def dpo_ipo(h: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023): mean((h - 1 / (2 * beta))^2)."""
    return (h - 1.0 / (2.0 * beta)).square().mean()


DPO_LOSS_KINDS = tuple(DPO_LOSSES)  # the --loss_type choices (registered above)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, kind: str = "sigmoid") -> tuple[Tensor, dict[str, Tensor]]:
    """The registered DPO loss `kind` (sigmoid, ipo) from sequence log-probs [B]; returns (scalar loss, detached stats).

    With h = (pc - rc) - (pr - rr): sigmoid = mean(-logsigmoid(beta * h)) (Rafailov et al.), ipo =
    mean((h - 1 / (2 * beta))^2) (Azar et al.). Stats: "chosen_rewards" [B] = beta * (pc - rc),
    "rejected_rewards" [B] = beta * (pr - rr), "margin" = their mean difference, "accuracy" = the share of
    pairs whose chosen reward is strictly higher.
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss kind {kind!r} (expected one of {tuple(DPO_LOSSES)})")
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    loss = DPO_LOSSES[kind](chosen_ratio - rejected_ratio, beta)
    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        stats = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
                 "margin": (chosen_rewards - rejected_rewards).mean(),
                 "accuracy": (chosen_rewards > rejected_rewards).float().mean()}
    return loss, stats
