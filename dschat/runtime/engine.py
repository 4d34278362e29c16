"""The DeepSpeed door: device, precision, process set-up, optimizer groups and `deepspeed.initialize`."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from dschat.runtime import dist
from dschat.runtime.errors import FlagError

NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def device() -> torch.device:
    """This rank's accelerator device (CPU when DeepSpeed picked its CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, dist.local_rank())


def offload_note(flags: dict[str, bool]) -> str | None:
    """A note when --offload* flags are set on a CPU run: they move ZeRO state to CPU memory, where it already is,
    so they change nothing (None otherwise)."""
    named = sorted(f"--{k}" for k, v in flags.items() if v is True and k.startswith("offload"))
    if not named or device().type != "cpu":
        return None
    return (f"note: {', '.join(named)} changes nothing on this CPU run: offloading moves ZeRO state from the GPU to "
            f"CPU memory, where everything already is")


def resolve_dtype(dtype: str) -> str:
    """"auto" -> bf16 on a GPU that supports it, else fp32; fp16 on CPU is an error naming --dtype."""
    on_cpu = device().type == "cpu"
    if dtype == "auto":
        return "bf16" if not on_cpu and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and on_cpu:
        raise FlagError("--dtype fp16 is not supported on CPU (DeepSpeed refuses it); use --dtype fp32 or bf16")
    return dtype


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype for "fp32"/"bf16"/"fp16"."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def optimizer_groups(model: torch.nn.Module, weight_decay: float, lora_lr: float) -> list[dict[str, Any]]:
    """Trainable parameters in three groups: decayed, LoRA (own learning rate), not decayed."""
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "lora": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "lora" if "lora_" in name else "no_decay" if any(k in name for k in NO_DECAY) else "decay"
        groups[key].append(param)
    out = [{"params": groups["decay"], "weight_decay": weight_decay},
           {"params": groups["lora"], "weight_decay": weight_decay, "lr": lora_lr},
           {"params": groups["no_decay"], "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


def make_adamw(params: list[dict], lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95), fused where torch has a fused kernel for every parameter's device.

    The fused step does the same arithmetic in one kernel per tensor group; on 2 CPU cores it updates
    SmolLM2-135M's weights ~5x faster than the default foreach step (measured 0.15 s vs 0.70 s).
    """
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in params for p in g["params"])
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), fused=fusable or None)


_WARNED_WARMUP: set[tuple[int, int]] = set()  # (warmup, total) pairs already warned about in this process


def warmup_steps(num_warmup_steps: int, warmup_ratio: float | None, total_steps: int) -> int:
    """The learning-rate warmup in optimizer steps: ceil(--warmup_ratio x total steps) when a ratio is given,
    else --num_warmup_steps (a warning, once, when that is longer than the run: the rate would never peak)."""
    if warmup_ratio is not None:
        return math.ceil(warmup_ratio * total_steps)
    if num_warmup_steps > total_steps and (num_warmup_steps, total_steps) not in _WARNED_WARMUP:
        _WARNED_WARMUP.add((num_warmup_steps, total_steps))
        dist.print_rank0(f"warning: --num_warmup_steps {num_warmup_steps} is beyond the run's {total_steps} optimizer "
                         f"steps: the learning rate never leaves warm-up (a linear warm-up ends at "
                         f"{total_steps / num_warmup_steps:.0%} of the peak); give fewer or --warmup_ratio")
    return num_warmup_steps


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, lora_lr: float,
                 scheduler_type: str, warmup_steps: int, total_steps: int):
    """deepspeed.initialize with AdamW (betas 0.9, 0.95) and an HF learning-rate schedule."""
    import deepspeed
    from transformers import get_scheduler

    params = optimizer_groups(model, weight_decay, lora_lr)
    if not params:
        raise FlagError("no trainable parameters (check --only_optimize_lora and the LoRA flags)")
    optimizer = make_adamw(params, lr)
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=max(total_steps, 1))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, dist_init_required=False)
    if dist.world_size() == 1 and ds_config.get("zero_optimization", {}).get("stage", 0) == 0:
        # One rank, no ZeRO: DeepSpeed's gradient all-reduce would flatten every gradient into a new buffer,
        # "average" it over one process and copy it back, each step. An identity: skip it.
        engine.enable_backward_allreduce = False
    return engine


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank stores: its ZeRO-3 partition (flat, possibly padded), else the whole
    tensor. Writing into it changes what the next ZeRO-3 gather (or a plain forward) sees."""
    return param.ds_tensor.data if hasattr(param, "ds_tensor") else param.data


def build_frozen_engine(model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize for a model that is never trained (reference, reward)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to `dev`."""
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def setup(dtype: str, seed: int | None) -> str:
    """Process group, seeds and thread count for a training run; returns the resolved dtype."""
    resolved = resolve_dtype(dtype)  # cheap flag checks before slow imports and the process group
    from transformers import set_seed

    dist.init_distributed()
    if "OMP_NUM_THREADS" not in os.environ and device().type == "cpu":
        # Ranks sharing a CPU must not oversubscribe it: spinning threads made runs 10x slower here.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_ranks, 1)))
    set_seed(seed if seed is not None else 1234)
    return resolved
