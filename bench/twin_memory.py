"""Peak memory of the hybrid twin (--enable_hybrid_engine): its first build and one refresh, under ZeRO-3.

    python bench/twin_memory.py                                   # builtin model, ZeRO-3, one rank
    python bench/twin_memory.py --model smollm2-135m --dtype fp32
    deepspeed --num_gpus 2 bench/twin_memory.py --model smollm2-135m   # 2 CPU ranks here (rank 0 printed)

Builds the actor engine as step 3 does (DeepSpeed at --zero_stage, weights in --dtype, LoRA with --lora_dim),
then measures the twin's first build (`Generator._refresh_twin` with no twin yet) and a second refresh
(the weights copied into the existing twin). The measure is this process's peak resident set size (VmHWM,
reset through /proc/self/clear_refs before each phase) minus its resident size when the phase starts, in MiB:
CPU memory, the device where DeepSpeed's CPU accelerator keeps every tensor. "held" is what the twin keeps
after its build. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dschat.data.prompts import PromptFormat  # noqa: E402
from dschat.models.loading import create_hf_model, load_tokenizer  # noqa: E402
from dschat.runtime import dist  # noqa: E402
from dschat.runtime.ds_config import get_train_ds_config  # noqa: E402
from dschat.runtime.engine import build_engine, torch_dtype  # noqa: E402
from dschat.trainers.rollout import Generator  # noqa: E402

MIB = 1024 * 1024


def status_kib(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def settle() -> int:
    """Free what can be freed, reset the peak RSS to the current RSS and return that RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return status_kib("VmRSS") * 1024


def peak_since(start: int) -> int:
    """Peak RSS (bytes) above `start` since the last settle()."""
    return status_kib("VmHWM") * 1024 - start


def main() -> None:
    """Build the actor engine, then print the twin's build and refresh peaks (MiB above the phase's start)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin", help="builtin, smollm2-135m, or a causal-LM folder")
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lora_dim", type=int, default=0, help="LoRA rank on the decoder layers (0: none)")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    dist.init_distributed()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model, padding_side="left")
    cfg = get_train_ds_config(stage=args.zero_stage, dtype=args.dtype, micro_batch=1, world_size=dist.world_size())
    model = create_hf_model(AutoModelForCausalLM, args.model, tok, cfg, torch_dtype(args.dtype))
    if args.lora_dim:
        from dschat.models.lora import apply_lora

        model = apply_lora(model, args.lora_dim, "layers.", False)
    engine = build_engine(model, cfg, 1e-5, 0.0, 1e-5, "constant", 0, 10)
    gen = Generator(engine, PromptFormat.create(tok), hybrid=True, zero_stage=args.zero_stage)
    n_params = sum(getattr(q, "ds_numel", q.numel()) for q in engine.module.parameters())
    model_mib = sum(getattr(q, "ds_numel", q.numel()) * q.element_size() for q in engine.module.parameters()) / MIB

    start = settle()
    gen._refresh_twin()
    build_peak = peak_since(start)
    held = status_kib("VmRSS") * 1024 - start
    start = settle()
    gen._refresh_twin()
    refresh_peak = peak_since(start)
    dist.print_rank0(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {model_mib:.1f} MiB in {args.dtype}; "
                     f"ZeRO-{args.zero_stage}, {dist.world_size()} rank(s), LoRA {args.lora_dim or 'off'}")
    dist.print_rank0(f"first build: peak +{build_peak / MIB:.1f} MiB (held after it: {held / MIB:.1f} MiB)")
    dist.print_rank0(f"refresh:     peak +{refresh_peak / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
