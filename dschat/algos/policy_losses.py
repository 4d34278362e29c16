"""Policy losses: a registry of pure functions over [B, T] tensors aligned on answer tokens.

Each entry returns the per-token loss [B, T] and detached stats; the caller reduces the per-token loss with
`dschat.algos.masked.aggregate` (`--loss_agg_mode`), which masks it, so every loss shares one normalisation over the
global batch. Entries leave masked positions unmasked: one multiply fewer in the graph keeps the default step's
gradients bit for bit those of `dschat.algos.losses.policy_loss` (the order autograd sums them in is unchanged). Step 3 picks a loss by name (`--policy_loss`); adding one is one function plus
`@register_policy_loss(name)` above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dschat.algos.masked import as_float_mask, masked_mean

LOG_RATIO_CLAMP = 20.0  # |log(pi / pi_old)| is clamped here before exp: a diverged token must not give inf


@dataclass(frozen=True)
class PolicyLossConfig:
    """Clip bounds: the ratio is clipped to [1 - cliprange, 1 + cliprange_high]; dual_clip C > 1 bounds the loss of
    a negative-advantage token at C x |A| (None: off)."""

    cliprange: float = 0.2
    cliprange_high: float | None = None  # None: = cliprange
    dual_clip: float | None = None

    @property
    def high(self) -> float:
        """The upper clip offset (eps_high)."""
        return self.cliprange if self.cliprange_high is None else self.cliprange_high


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, PolicyLossConfig], tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator that registers fn(logprobs, old_logprobs, advantages, mask, cfg) -> (per-token loss, stats) as
    `--policy_loss name`."""
    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn
    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    """The registered policy loss called `name` (ValueError listing the valid names otherwise)."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid choices: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def ratio_stats(log_ratio: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Detached token-level stats of log(pi / pi_old): approx_kl (k3), ratio_mean and ratio_max over valid tokens."""
    with torch.no_grad():
        log_ratio = log_ratio.detach()
        ratio = torch.exp(log_ratio)
        valid = mask.bool()
        ratio_max = ratio[valid].max() if valid.any() else torch.ones((), device=ratio.device)
        return {"approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
                "ratio_mean": masked_mean(ratio, mask), "ratio_max": ratio_max}


@register_policy_loss("ppo")
def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, action_mask: Tensor,
             cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) per token (DAPO's clip-higher when
    eps_high > eps), with dual-clip: for A < 0 the loss is at most C |A| (Ye et al. 2020)."""
    mask = as_float_mask(action_mask, logprobs.float())
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.high)
    loss = torch.maximum(unclipped, clipped)
    stats = {}
    if cfg.dual_clip is not None:
        bounded = torch.minimum(loss, -adv * cfg.dual_clip)
        with torch.no_grad():
            stats["dual_clipfrac"] = masked_mean(((adv < 0) & (bounded < loss)).float(), mask)
        loss = torch.where(adv < 0, bounded, loss)
    with torch.no_grad():
        stats["clipfrac"] = masked_mean((clipped > unclipped).float(), mask)
    return loss, stats | ratio_stats(log_ratio, mask)


@register_policy_loss("gspo")
def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, action_mask: Tensor,
              cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025), token form: s_it = sg[s_i] pi_t / sg[pi_t] with s_i = exp(mean_t log(pi / pi_old))
    over the answer's tokens, clipped to [1 - eps, 1 + eps_high]: max(-A s_it, -A clip(s_it)) per token (the value
    and clipping are the sequence's, the gradient flows through each token's log-prob)."""
    mask = as_float_mask(action_mask, logprobs.float())
    lp = logprobs.float()
    token_log_ratio = lp - old_logprobs.float()
    seq_log_ratio = masked_mean(token_log_ratio, mask, dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    log_s = seq_log_ratio.detach().unsqueeze(1) + lp - lp.detach()
    s = torch.exp(log_s)
    adv = advantages.float()
    unclipped = -adv * s
    clipped = -adv * s.clamp(1.0 - cfg.cliprange, 1.0 + cfg.high)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        rows = mask.sum(-1) > 0
        seq_clipped = ((clipped > unclipped).float() * mask).sum(-1) > 0
        stats = {"clipfrac": seq_clipped[rows].float().mean() if rows.any() else torch.zeros(()),
                 "seq_ratio_mean": torch.exp(seq_log_ratio)[rows].mean() if rows.any() else torch.ones(())}
    return loss, stats | ratio_stats(token_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), mask)


@register_policy_loss("cispo")
def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, action_mask: Tensor,
               cfg: PolicyLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1 2025): -sg[clip(r, 1 - eps, 1 + eps_high)] A log pi per token: REINFORCE weighted by the
    clipped importance ratio, so clipped tokens keep their gradient (only the weight is capped)."""
    mask = as_float_mask(action_mask, logprobs.float())
    lp = logprobs.float()
    log_ratio = (lp - old_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    weight = ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.high)
    loss = -weight * advantages.float() * lp
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((weight != ratio).float(), mask)}
    return loss, stats | ratio_stats(log_ratio, mask)
