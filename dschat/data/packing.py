"""Shared-prompt packing of chosen/rejected pairs: one row [prompt, chosen answer, rejected answer] per pair.

A chosen and a rejected sequence start with the same prompt; run separately, the prompt goes through the
model twice. Packed, each pair is one row: the shared prefix, then the chosen tail, then the rejected tail,
with a block attention mask (each tail sees the prefix and itself, never the other tail) and position ids
that restart the rejected tail where the prefix ends, so every token sees exactly what it sees in its own
sequence. `unpack_pairs` maps per-token outputs back to the [chosen; rejected] layout of RewardCollator.
Pure tensor functions; the model call lives in dschat.models.heads.pair_token_values.

Row packing (`pack_rows`, padding-free batches): the real tokens of a padded batch laid end to end in fewer rows,
each original row's position ids restarting at 0, and no attention mask: transformers then finds the packed
sequences from the position ids and never lets a token attend across them (dschat.models.heads.packable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedPairs:
    """Model inputs for B packed pairs in K rows (K = B, or fewer when padding-free), and where each original
    position went.

    input_ids [K, S]; attention_mask [K, 1, S, S] additive (0 = attend, dtype's min = masked);
    position_ids [K, S]; index [2B, L]: flat position (packed row x S + column) of every position of the original
    [chosen; rejected] rows (0 on their padding); valid [2B, L]: the original attention mask as bool.
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


def first_fit(lengths: list[int], width: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit-decreasing placement of rows of `lengths` into rows of `width`: ((packed row, offset) per row,
    room left in each packed row). A row of length 0 gets (0, 0) and takes no room."""
    free: list[int] = []
    place = [(0, 0)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] == 0:
            continue
        j = next((j for j, room in enumerate(free) if room >= lengths[i]), len(free))
        if j == len(free):
            free.append(width)
        place[i] = (j, width - free[j])
        free[j] -= lengths[i]
    return place, free


def pack_pairs(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int, dtype: torch.dtype,
               padding_free: bool = False) -> PackedPairs:
    """Pack a right-padded [chosen; rejected] batch [2B, L] into B rows that share each pair's prompt; with
    `padding_free`, those rows then laid end to end in as few rows as fit (a block-diagonal mask keeps pairs apart).
    PackedPairs.index then holds flat positions in the packed [K, S] layout."""
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
    if padding_free and size:
        place, free = first_fit([row.numel() for row in rows], size)
    else:
        place, free = [(i, 0) for i in range(n_pairs)], [size - row.numel() for row in rows]
    k = len(free)
    ids = torch.full((k, size), pad_token_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros((k, size), dtype=torch.long, device=dev)
    allowed = torch.zeros((k, size, size), dtype=torch.bool, device=dev)
    index = torch.zeros((2 * n_pairs, width), dtype=torch.long, device=dev)
    for i, (row, (lc, s, lr), (j, o)) in enumerate(zip(rows, spans, place)):
        end = row.numel()
        col = torch.arange(end, device=dev)
        ids[j, o:o + end] = row
        pos[j, o:o + lc] = torch.arange(lc, device=dev)
        pos[j, o + lc:o + end] = torch.arange(s, lr, device=dev)
        causal = col[None, :] <= col[:, None]  # [q, k]: k <= q
        in_chosen, in_tail = col < lc, col >= lc
        # chosen queries: causal within the chosen sequence; rejected-tail queries: the prefix, then causal tail
        allowed[j, o:o + end, o:o + end] = causal & ((in_chosen[:, None] & in_chosen[None, :])
                                                     | (in_tail[:, None] & ((col[None, :] < s) | in_tail[None, :])))
        base = j * size + o
        index[i, :lc] = base + torch.arange(lc, device=dev)
        index[n_pairs + i, :s] = base + torch.arange(s, device=dev)
        index[n_pairs + i, s:lr] = base + torch.arange(lc, end, device=dev)
    for j, room in enumerate(free):  # padding attends to itself only (no all-masked softmax row)
        tail = torch.arange(size - room, size, device=dev)
        allowed[j, tail, tail] = True
    mask = torch.zeros((k, 1, size, size), dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return PackedPairs(ids, mask, pos, index, valid)


def unpack_pairs(values: Tensor, packed: PackedPairs) -> Tensor:
    """Per-token values [K, S] of packed rows back to the [chosen; rejected] layout [2B, L] (0 on padding)."""
    return values.reshape(-1)[packed.index].masked_fill(~packed.valid, 0)


@dataclass
class PackedRows:
    """A padded batch's rows laid end to end in fewer rows of the same width (padding-free).

    input_ids [K, C] and position_ids [K, C] (each original row numbered from 0 where it starts, so a model that
    finds packed sequences from position ids never attends across rows); index [N]: the flat position in the
    K x C layout of each of the batch's N real tokens, in the original batch's row-major order; valid [B, T]: the
    original attention mask as bool. The packed rows' tails are padding, numbered from 0 as a sequence of their
    own: nothing real attends to it and its outputs are dropped.
    """

    input_ids: Tensor
    position_ids: Tensor
    index: Tensor
    valid: Tensor


def pack_rows(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int = 0) -> PackedRows | None:
    """First-fit-decreasing packing of the real tokens of a padded batch [B, T] (left or right padding; each row's
    real tokens contiguous) into rows as wide as its longest row; None when that saves no position."""
    valid = attention_mask.bool()
    lengths = valid.sum(1).tolist()
    width = max(max(lengths), 1)
    place, free = first_fit(lengths, width)
    start = [j * width + o for j, o in place]  # where each original row starts in the flat packed layout
    if not free or len(free) * width >= input_ids.numel():
        return None
    dev = input_ids.device
    first = valid.long().cumsum(1) - 1  # each real token's position in its own row
    index = (torch.tensor(start, dtype=torch.long, device=dev)[:, None] + first)[valid]
    ids = torch.full((len(free) * width,), pad_token_id, dtype=input_ids.dtype, device=dev)
    ids[index] = input_ids[valid]
    col = torch.arange(width, device=dev)
    tail = torch.tensor([width - room for room in free], dtype=torch.long, device=dev)  # where each tail starts
    pos = (col[None, :] - tail[:, None]).clamp(min=0).flatten()  # padding tails: a sequence from 0 of their own
    pos[index] = first[valid]
    return PackedRows(ids.view(len(free), width), pos.view(len(free), width), index, valid)


def unpack_rows(values: Tensor, packed: PackedRows, fill: float = 0.0) -> Tensor:
    """Per-position outputs of the packed rows [K, C, ...] back to the batch's layout [B, T, ...] (`fill` on padding)."""
    flat = values.reshape(-1, *values.shape[2:])
    out = flat.new_full((*packed.valid.shape, *values.shape[2:]), fill)
    out[packed.valid] = flat[packed.index]
    return out
