"""Collators: pad each batch to its own longest row (not to --max_seq_len) and build masks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, left: bool = False) -> torch.Tensor:
    """[B, L] tensor of `seqs` padded with `pad_value` on the right (or left) to the longest one."""
    longest = max(len(s) for s in seqs)
    out = torch.full((len(seqs), longest), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            start = longest - len(s) if left else 0
            out[i, start: start + len(s)] = torch.as_tensor(s)
    return out


def _mask(seqs: Sequence[Sequence[int]], left: bool = False) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in seqs], 0, left)


class SFTCollator:
    """Phase 1: input_ids / attention_mask / labels (-100 on prompt and padding), right-padded."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": pad_sequences(ids, self.pad_token_id), "attention_mask": _mask(ids),
                "labels": pad_sequences([r["labels"] for r in rows], -100)}


class RewardCollator:
    """Phase 2: chosen rows then rejected rows stacked into one [2B, L] right-padded batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        return {"input_ids": pad_sequences(seqs, self.pad_token_id), "attention_mask": _mask(seqs),
                "prompt_len": torch.tensor([r["prompt_len"] for r in rows] * 2)}


class PromptCollator:
    """Phase 3: prompts left-padded so that every answer starts at the same column, with each row's prompt
    (text, or a list of messages) and other columns ("fields") for the rewards."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        ids = [r["prompt_ids"] for r in rows]
        return {"prompt": pad_sequences(ids, self.pad_token_id, left=True),
                "prompt_att_mask": _mask(ids, left=True),
                "prompt_text": [r["prompt"] if "prompt" in r else json.loads(r["prompt_json"]) if "prompt_json" in r
                                else None for r in rows],
                "fields": [json.loads(r["fields"]) if r.get("fields") else {} for r in rows]}


class DPOCollator:
    """Phase 2 for DPO: [chosen; rejected] right-padded [2B, L] with labels (-100 on prompt and padding)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        prompt_lens = [r["prompt_len"] for r in rows] * 2
        labels = [[-100] * n + list(s[n:]) for s, n in zip(seqs, prompt_lens)]
        return {"input_ids": pad_sequences(seqs, self.pad_token_id), "attention_mask": _mask(seqs),
                "labels": pad_sequences(labels, -100)}
