"""The `reward_model` reward: a trained step-2 model's end score, normalised with its reward_stats.json and clipped.

One code path for step 3's training rewards, its evaluation and --gold_reward_model.
"""

from __future__ import annotations

from typing import Any

import torch

from dschat.algos.masked import end_scores
from dschat.models.heads import token_values
from dschat.rewards.registry import RewardContext, RewardFn, register_reward


class RewardModelScorer:
    """Scores whole sequences with a one-label reward model: (raw - mean) / std when normalising, then clipped."""

    def __init__(self, model: Any, stats: dict[str, float] | None = None, normalize: bool = True,
                 clip: float | None = None, padding_free: bool = False):
        self.model, self.stats, self.normalize, self.clip = model, stats or {}, normalize, clip
        self.padding_free = padding_free

    @torch.no_grad()
    def scores(self, seq: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] fp32 scores of left-padded `seq` (prompt + answer) at each row's last attended token."""
        values = token_values(self.model, seq, attention_mask, padding_free=self.padding_free)
        out = end_scores(values, attention_mask).float()
        if self.normalize and self.stats:
            out = (out - self.stats["mean"]) / max(self.stats["std"], 1e-6)
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        return out

    def __call__(self, prompts: list[Any], completions: list[Any], *, seq: torch.Tensor,
                 attention_mask: torch.Tensor, **_: Any) -> list[float]:
        """The reward-function form: scores of the rollout's token ids (the text is not re-tokenised)."""
        return self.scores(seq, attention_mask).tolist()


@register_reward("reward_model", needs_model=True, needs_tokens=True, factory=True)
def make_reward_model(ctx: RewardContext) -> RewardFn:
    """Step 3's reward model (--critic_model_name_or_path), normalised (--normalize_reward) and clipped
    (--clip_reward_value)."""
    if ctx.reward_model is None:
        raise ValueError("reward 'reward_model' needs a reward model; the engine built none")
    return RewardModelScorer(ctx.reward_model, ctx.reward_stats, ctx.normalize_reward, ctx.clip_reward_value,
                             ctx.padding_free)
