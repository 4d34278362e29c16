"""Causal-LM forwards that project onto the vocabulary only where a loss or a log-prob reads the logits.

A full forward materialises [B, T, V] logits (V = 49k for SmolLM2) although step 1, DPO and the
perplexity only read the label tokens and step 3 only the answer tokens. Hugging Face models take
`logits_to_keep` (an int: the last N positions; a 1-D tensor: these positions in every row; in newer
releases a 2-D bool mask: exactly these tokens); these helpers pass the tightest form the model
accepts and fall back to slicing full logits for a model that takes none. Results equal the full
forward's up to float rounding of the smaller LM-head matmul.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import Tensor

from dschat.models.heads import hf_model, position_kwargs


@functools.cache
def _support(cls: type) -> str:
    """How `cls.forward` can restrict logits: "mask" (2-D bool), "index" (int / 1-D tensor) or "none"."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "none"
    if "logits_to_keep" not in params:
        return "none"
    module = sys.modules.get(cls.__module__)
    return "mask" if getattr(module, "slice_logits_to_keep", None) is not None else "index"


def keep_mode(model) -> str:
    """"mask", "index" or "none": the tightest `logits_to_keep` form `model` (or its engine) accepts."""
    return _support(type(hf_model(model)))  # peft passes logits_to_keep through to this model


def label_positions(labels: Tensor) -> Tensor:
    """[B, T] bool: the positions whose next token is a label (labels [B, T], -100 = not a label)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def logits_at(model, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> Tensor:
    """Logits [N, V] at the True positions of keep [B, T] (row-major order), projecting only where possible;
    positions come from the attention mask."""
    mode = keep_mode(model)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
              **position_kwargs(model, attention_mask)}
    if mode == "mask":
        return model(**kwargs, logits_to_keep=keep).logits
    if mode == "index":
        cols = keep.any(0).nonzero().squeeze(1)
        if cols.numel() == 0:  # nothing to keep: one column so the forward still runs
            cols = torch.zeros(1, dtype=torch.long, device=keep.device)
        return model(**kwargs, logits_to_keep=cols).logits[keep[:, cols]]
    return model(**kwargs).logits[keep]


def label_logits(model, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [N, V], targets [N], row of each target [N]) at the label tokens of a batch with "labels"."""
    labels = batch["labels"]
    keep = label_positions(labels)
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], keep)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    return logits, labels[:, 1:][keep[:, :-1]], rows


def answer_logits(model, seq: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Logits [B, T - prompt_len, V] that predict the answer tokens seq[:, prompt_len:] (left-padded prompts)."""
    keep = seq.shape[1] - prompt_len + 1  # the positions prompt_len - 1 .. T - 1; the last one predicts nothing
    kwargs = {"input_ids": seq, "attention_mask": attention_mask, "use_cache": False,
              **position_kwargs(model, attention_mask)}  # left padding must not shift the positions
    if keep_mode(model) == "none":
        return model(**kwargs).logits[:, prompt_len - 1: -1]
    out = model(**kwargs, logits_to_keep=keep).logits
    return out[:, :-1]
