"""Saving plain Hugging Face model directories from training engines, at every ZeRO stage, atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dschat.utils import dist

DONE_MARKER = "dschat_complete.json"


@contextlib.contextmanager
def atomic_dir(out_dir: str) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir` by rename, else it is removed."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict on rank 0 ({} elsewhere); ZeRO-3 partitions are gathered one parameter at a time."""
    import deepspeed

    module = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if hasattr(param, "ds_id"):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.is_rank0():
                    out[name] = param.data.detach().cpu().clone()
        elif dist.is_rank0():
            out[name] = param.data.detach().cpu().clone()
    if dist.is_rank0():
        keys = module.state_dict().keys()
        out.update({n: b.detach().cpu().clone() for n, b in module.named_buffers() if n in keys})
    return out


def merge_lora_state_dict(state: dict[str, torch.Tensor], peft_config: Any) -> dict[str, torch.Tensor]:
    """Fold LoRA weights into their base Linear (W + scale * B @ A) and drop peft's name prefixes."""
    scale = peft_config.lora_alpha / peft_config.r
    merged: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer.weight" in name:
            stem = name.split(".base_layer.weight")[0]
            lora_a = state[next(k for k in state if k.startswith(stem + ".lora_A."))]
            lora_b = state[next(k for k in state if k.startswith(stem + ".lora_B."))]
            tensor = (tensor.float() + scale * (lora_b.float() @ lora_a.float())).to(tensor.dtype)
        clean = name.replace(".base_layer", "").replace(".modules_to_save.default", "")
        merged[clean.removeprefix("base_model.model.")] = tensor
    return merged


def save_hf_model(model: torch.nn.Module, tokenizer, out_dir: str, extra_json: dict[str, Any] | None = None) -> None:
    """Write `model` (engine or module; LoRA merged) with its tokenizer as a plain HF directory, atomically.

    Every rank must call this (ZeRO-3 gathers are collective); only rank 0 writes. `extra_json` maps file
    names to JSON content stored beside the model. A completion marker is written last.
    """
    module = unwrap(model)
    state = gathered_state_dict(module)
    if dist.is_rank0():
        base = module
        if hasattr(module, "peft_config"):
            state = merge_lora_state_dict(state, module.peft_config["default"])
            base = module.get_base_model()
        with atomic_dir(out_dir) as tmp:
            base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for name, content in (extra_json or {}).items():
                (tmp / name).write_text(json.dumps(content, indent=1))
            (tmp / DONE_MARKER).write_text(json.dumps({"complete": True}))
    dist.barrier()
