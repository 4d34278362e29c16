"""The training skeleton the three steps share: precision, LoRA, optimizer, scheduler, DeepSpeed engine,
data loaders, progress bar and TensorBoard."""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from dschat.utils import dist
from dschat.utils.args import FlagError

NO_DECAY = ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight")


def device() -> torch.device:
    """This rank's accelerator device (CPU when DeepSpeed picked its CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device("cpu") if name == "cpu" else torch.device(name, dist.local_rank())


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


def apply_lora(model: torch.nn.Module, dim: int, module_name: str, only_optimize_lora: bool,
               flag: str = "--lora_module_name", keep_trainable: tuple[str, ...] = ()) -> torch.nn.Module:
    """Wrap `model` with peft LoRA of rank `dim` on every Linear whose name contains `module_name`."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and module_name in name
               and not any(name.endswith(k) for k in keep_trainable)]
    if not targets:
        raise FlagError(f"{flag} '{module_name}' matches no Linear layer of {type(model).__name__}")
    # lora_alpha=1 gives DeepSpeed-Chat's scaling of 1/r.
    config = LoraConfig(r=dim, lora_alpha=1, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=list(keep_trainable) or None)
    model = get_peft_model(model, config)
    if not only_optimize_lora:  # DeepSpeed-Chat trains the base weights too unless told otherwise
        for name, param in model.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(True)
    return model


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


def build_engine(model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, lora_lr: float,
                 scheduler_type: str, warmup_steps: int, total_steps: int):
    """deepspeed.initialize with AdamW (betas 0.9, 0.95) and an HF learning-rate schedule."""
    import deepspeed
    from transformers import get_scheduler

    params = optimizer_groups(model, weight_decay, lora_lr)
    if not params:
        raise FlagError("no trainable parameters (check --only_optimize_lora and the LoRA flags)")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    scheduler = get_scheduler(scheduler_type, optimizer, num_warmup_steps=warmup_steps,
                              num_training_steps=max(total_steps, 1))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config, dist_init_required=False)
    return engine


def build_frozen_engine(model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize for a model that is never trained (reference, reward)."""
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine


def make_loader(dataset, collator, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader over this rank's shard (DistributedSampler, seeded; keeps the tail when evaluating)."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=shuffle,
                                 seed=seed, drop_last=shuffle)
    # Its own generator: starting an epoch (iter) would otherwise draw from the global torch RNG, and a
    # resumed run, which restores that RNG and then starts its epoch, would drift from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def steps_per_epoch(loader: DataLoader, grad_accum: int) -> int:
    """Optimizer steps in one pass over `loader`."""
    return math.ceil(len(loader) / grad_accum)


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to `dev`."""
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Logger:
    """Rank-0 progress bar (tqdm) and TensorBoard scalars; silent on other ranks."""

    def __init__(self, total: int, desc: str, tb_dir: str | None = None, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True,
                        disable=not dist.is_rank0(), mininterval=1.0)
        self.writer = None
        if tb_dir and dist.is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tb_dir)
        self.start = time.time()

    def step(self, step: int, scalars: dict[str, float], shown: tuple[str, ...] = ()) -> None:
        """Advance the bar one step, show `shown` scalars on it and log all of them to TensorBoard."""
        self.bar.update(1)
        if shown:
            self.bar.set_postfix({k: f"{scalars[k]:.4g}" for k in shown if k in scalars}, refresh=False)
        self.scalars(step, scalars)

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Log scalars to TensorBoard at `step`."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def write(self, msg: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if dist.is_rank0():
            self.bar.write(msg)

    def close(self) -> None:
        """Close the bar and flush TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def setup(args: argparse.Namespace) -> str:
    """Process group, seeds and precision for a training step; returns the resolved dtype."""
    dtype = resolve_dtype(args.dtype)  # cheap flag checks before slow imports and the process group
    from transformers import set_seed

    dist.init_distributed()
    if "OMP_NUM_THREADS" not in os.environ and device().type == "cpu":
        # Ranks sharing a CPU must not oversubscribe it: spinning threads made runs 10x slower here.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_ranks, 1)))
    set_seed(args.seed if args.seed is not None else 1234)
    return dtype
