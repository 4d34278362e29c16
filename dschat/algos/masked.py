"""Masked reductions and sequence-end positions over [B, T] tensors.

A mask is 1 on valid entries (answer tokens, real tokens) and 0 elsewhere; it may be bool or float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def as_float_mask(mask: Tensor, like: Tensor) -> Tensor:
    """`mask` as a float tensor on `like`'s device (in `like`'s dtype when that is floating)."""
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
    m = as_float_mask(mask, x)
    return (x * m).sum() if dim is None else (x * m).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries where mask (same shape) is 1; 0 (not NaN) where no entry is valid."""
    m = as_float_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1.0)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True,
                  reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Whiten x [B, T] over its valid (mask==1) entries; 0 where masked. `reduce_sum` sums a tensor over the ranks
    that share the rollout (the caller passes runtime.dist.all_reduce_sum; None: this process's entries only), so
    this stays pure math with no collective of its own.

    Uses the unbiased variance (like torch.var) when the global count is > 1. With shift_mean=False the
    global mean is added back (only the scale changes).
    """
    reduce = reduce_sum if reduce_sum is not None else (lambda t: t)
    xf = x.float()
    m = as_float_mask(mask, xf)
    total, count = reduce(torch.stack([(xf * m).sum(), m.sum()])).unbind()
    mean = total / count.clamp(min=1.0)
    # a second pass over squared deviations avoids the cancellation of E[x^2] - E[x]^2
    ssd = reduce(((xf - mean).square() * m).sum())
    # torch.where instead of a python branch keeps this free of a device->host sync
    var = torch.where(count > 1, ssd / (count - 1.0).clamp(min=1.0), torch.zeros_like(ssd))
    out = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def end_index(attention_mask: Tensor) -> Tensor:
    """[B] index of the rightmost position with attention_mask == 1 (0 for an all-zero row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def end_scores(values: Tensor, attention_mask: Tensor) -> Tensor:
    """[B] value at each sequence's last real token (rightmost attention_mask == 1)."""
    return values.gather(1, end_index(attention_mask).unsqueeze(1)).squeeze(1)


def last_valid_index(action_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index [B] of the last 1 in action_mask [B, T] (0 for empty rows) and a bool [B] 'row has any'."""
    valid = action_mask.bool()
    T = valid.shape[1]
    pos = torch.arange(1, T + 1, device=valid.device).expand_as(valid)
    last = (pos * valid).max(dim=1).values - 1
    return last.clamp(min=0), valid.any(dim=1)


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_count(mask: Tensor, mode: str) -> Tensor:
    """What `aggregate` divides by in `mode`, counted on this process's rows: valid tokens for token-mean, rows with
    a valid token otherwise (a float scalar; the caller sums it over ranks for a global normalisation)."""
    m = mask.float()
    if mode == "token-mean":
        return m.sum()
    if mode in LOSS_AGG_MODES:
        return (m.sum(-1) > 0).float().sum()
    raise ValueError(f"unknown loss aggregation {mode!r}; valid choices: {LOSS_AGG_MODES}")


def aggregate(x: Tensor, mask: Tensor, mode: str = "token-mean", count: float | Tensor | None = None,
              horizon: int | None = None, weight: float = 1.0) -> Tensor:
    """Reduce per-token values x [B, T] over valid (mask == 1) tokens to a scalar, one rule for every loss term.

    token-mean: sum(x) / count (tokens); seq-mean-token-mean: sum over rows of each row's token mean / count (rows);
    seq-mean-token-sum-norm (Dr. GRPO): sum over rows of (row's token sum / horizon) / count (rows), horizon a
    constant (the maximum answer length), so no answer's tokens weigh more for being short. `count` is the
    divisor's share of this process when the batch is sharded (the global agg_count / world size; None: the local
    agg_count); a count of 0 divides by 1 (the sum is 0 then). A `weight` other than 1 multiplies the sum before the
    division (weight * sum / count: the rounding step 3's entropy bonus always had).
    """
    if count is None:
        count = agg_count(mask, mode)
    if isinstance(count, Tensor):  # a local (integer) count
        count = count.clamp(min=1.0)
    elif count == 0:
        count = 1.0
    if mode == "token-mean":
        total = masked_sum(x, mask)
    else:
        m = as_float_mask(mask, x)
        row_sums = (x * m).sum(-1)
        if mode == "seq-mean-token-mean":
            total = (row_sums / m.sum(-1).clamp(min=1.0)).sum()
        elif mode == "seq-mean-token-sum-norm":
            if not horizon or horizon < 1:
                raise ValueError("seq-mean-token-sum-norm needs a horizon >= 1 (the maximum answer length)")
            total = (row_sums / horizon).sum()
        else:
            raise ValueError(f"unknown loss aggregation {mode!r}; valid choices: {LOSS_AGG_MODES}")
    return total / count if weight == 1.0 else weight * total / count


def truncated_rows(answer_ids: Tensor, action_mask: Tensor, eos_token_id: int) -> Tensor:
    """Bool [B]: answers with no end-of-turn token among their valid tokens (cut at the length limit)."""
    return ~((answer_ids == eos_token_id) & action_mask.bool()).any(dim=1)
