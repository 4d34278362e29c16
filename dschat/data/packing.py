"""Shared-prompt packing of chosen/rejected pairs: one row [prompt, chosen answer, rejected answer] per pair.

A chosen and a rejected sequence start with the same prompt; run separately, the prompt goes through the
model twice. Packed, each pair is one row: the shared prefix, then the chosen tail, then the rejected tail,
with a block attention mask (each tail sees the prefix and itself, never the other tail) and position ids
that restart the rejected tail where the prefix ends, so every token sees exactly what it sees in its own
sequence. `unpack_pairs` maps per-token outputs back to the [chosen; rejected] layout of RewardCollator.
Pure tensor functions; the model call lives in dschat.models.heads.pair_token_values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedPairs:
    """Model inputs for B packed pairs, and where each original position went.

    input_ids [B, S]; attention_mask [B, 1, S, S] additive (0 = attend, dtype's min = masked);
    position_ids [B, S]; index [2B, L]: packed column of every position of the original [chosen; rejected]
    rows (0 on their padding); valid [2B, L]: the original attention mask as bool.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    index: Tensor
    valid: Tensor


def shared_prefix_len(a: Tensor, b: Tensor) -> int:
    """Length of the common prefix of 1-D token tensors a and b, leaving each at least one token of its own."""
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    common = int(diff[0]) if diff.numel() else n
    return max(0, min(common, n - 1))


def pack_pairs(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int, dtype: torch.dtype) -> PackedPairs:
    """Pack a right-padded [chosen; rejected] batch [2B, L] into B rows that share each pair's prompt."""
    n_pairs, width = input_ids.shape[0] // 2, input_ids.shape[1]
    dev = input_ids.device
    valid = attention_mask.bool()
    rows, spans = [], []
    for i in range(n_pairs):
        c, r = input_ids[i][valid[i]], input_ids[n_pairs + i][valid[n_pairs + i]]
        s = shared_prefix_len(c, r)
        rows.append(torch.cat([c, r[s:]]))
        spans.append((c.numel(), s, r.numel()))
    size = max(row.numel() for row in rows)
    ids = torch.full((n_pairs, size), pad_token_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((n_pairs, size), dtype=torch.long, device=dev)
    allowed = torch.zeros((n_pairs, size, size), dtype=torch.bool, device=dev)
    index = torch.zeros((2 * n_pairs, width), dtype=torch.long, device=dev)
    col = torch.arange(size, device=dev)
    causal = col[None, :] <= col[:, None]  # [q, k]: k <= q
    for i, (row, (lc, s, lr)) in enumerate(zip(rows, spans)):
        end = row.numel()
        ids[i, :end] = row
        pos[i, :lc] = torch.arange(lc, device=dev)
        pos[i, lc:end] = torch.arange(s, lr, device=dev)
        in_chosen = col < lc
        in_tail = (col >= lc) & (col < end)
        # chosen queries: causal within the chosen sequence; rejected-tail queries: the prefix, then causal tail
        allowed[i] = causal & ((in_chosen[:, None] & in_chosen[None, :])
                               | (in_tail[:, None] & ((col[None, :] < s) | in_tail[None, :])))
        allowed[i, end:, :] = False
        allowed[i, col[end:], col[end:]] = True  # padding attends to itself only (no all-masked softmax row)
        index[i, :lc] = torch.arange(lc, device=dev)
        index[n_pairs + i, :s] = torch.arange(s, device=dev)
        index[n_pairs + i, s:lr] = torch.arange(lc, end, device=dev)
    mask = torch.zeros((n_pairs, 1, size, size), dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return PackedPairs(ids, mask, pos, index, valid)


def unpack_pairs(values: Tensor, packed: PackedPairs) -> Tensor:
    """Per-token values [B, S] of packed rows back to the [chosen; rejected] layout [2B, L] (0 on padding)."""
    source = torch.cat([values, values], dim=0)  # row i and row B + i both read pair i
    return source.gather(1, packed.index).masked_fill(~packed.valid, 0)
