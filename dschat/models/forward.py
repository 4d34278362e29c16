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

from dschat.data.packing import PackedRows, pack_rows
from dschat.models.heads import hf_model, packable, position_kwargs


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


def _call(model, kwargs: dict, keep: Tensor) -> Tensor:
    """Logits [N, V] at the True positions of keep [B, T] (row-major), in the tightest form the model takes."""
    mode = keep_mode(model)
    if mode == "mask":
        return model(**kwargs, logits_to_keep=keep).logits
    if mode == "index":
        cols = keep.any(0).nonzero().squeeze(1)
        if cols.numel() == 0:  # nothing to keep: one column so the forward still runs
            cols = torch.zeros(1, dtype=torch.long, device=keep.device)
        return model(**kwargs, logits_to_keep=cols).logits[keep[:, cols]]
    return model(**kwargs).logits[keep]


def label_positions(labels: Tensor) -> Tensor:
    """[B, T] bool: the positions whose next token is a label (labels [B, T], -100 = not a label)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def logits_at(model, input_ids: Tensor, attention_mask: Tensor, keep: Tensor, padding_free: bool = False) -> Tensor:
    """Logits [N, V] at the True positions of keep [B, T] (row-major order; real tokens only), projecting only where
    possible; positions come from the attention mask. `padding_free`: the rows run packed end to end
    (dschat.data.packing.pack_rows) where the model allows it and packing saves positions; equal up to rounding."""
    packed = pack_rows(input_ids, attention_mask) if padding_free and packable(model) else None
    if packed is None:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
                  **position_kwargs(model, attention_mask)}
        return _call(model, kwargs, keep)
    return packed_logits(model, packed, keep)


def packed_logits(model, packed: PackedRows, keep: Tensor) -> Tensor:
    """logits_at for a batch packed by pack_rows: one forward of the packed rows, logits back in keep's order."""
    where = packed.index[keep[packed.valid]]  # packed flat position of each kept token, in the batch's order
    flat = torch.zeros(packed.input_ids.numel(), dtype=torch.bool, device=keep.device)
    flat[where] = True
    kwargs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    logits = _call(model, kwargs, flat.view(packed.input_ids.shape))  # in packed row-major order
    return logits[torch.argsort(torch.argsort(where))]


def label_logits(model, batch: dict, padding_free: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(logits [N, V], targets [N], row of each target [N]) at the label tokens of a batch with "labels"
    (right-padded; `padding_free` as in logits_at)."""
    labels = batch["labels"]
    keep = label_positions(labels)
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], keep, padding_free)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    return logits, labels[:, 1:][keep[:, :-1]], rows


def answer_logits(model, seq: Tensor, attention_mask: Tensor, prompt_len: int, padding_free: bool = False) -> Tensor:
    """Logits [B, T - prompt_len, V] that predict the answer tokens seq[:, prompt_len:] (left-padded prompts).
    `padding_free`: the rows run packed (see logits_at); the logits at padding positions are 0."""
    packed = pack_rows(seq, attention_mask) if padding_free and packable(model) else None
    if packed is not None:
        keep = torch.zeros_like(packed.valid)
        keep[:, prompt_len - 1: -1] = packed.valid[:, prompt_len - 1: -1]
        logits = packed_logits(model, packed, keep)
        out = logits.new_zeros((seq.shape[0], seq.shape[1] - prompt_len, logits.shape[-1]))
        return out.index_put((keep[:, prompt_len - 1: -1],), logits)
    keep = seq.shape[1] - prompt_len + 1  # the positions prompt_len - 1 .. T - 1; the last one predicts nothing
    kwargs = {"input_ids": seq, "attention_mask": attention_mask, "use_cache": False,
              **position_kwargs(model, attention_mask)}  # left padding must not shift the positions
    if keep_mode(model) == "none":
        return model(**kwargs).logits[:, prompt_len - 1: -1]
    out = model(**kwargs, logits_to_keep=keep).logits
    return out[:, :-1]
