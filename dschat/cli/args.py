"""Flag groups shared by the three training steps (DeepSpeed-Chat's names and meanings).

Defaults point at the builtin model and dataset so every entry point runs with no arguments. Where a
default differs from DeepSpeed-Chat's it is because DeepSpeed-Chat's suits 1B+ pretrained models; the
help text says so.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from dschat.data.phases import BUILTIN_NAMES, parse_split
from dschat.models.builtin import BUILTIN_MODEL_DIR, resolve_model_name
from dschat.models.export import check_output_dir, nearest_existing
from dschat.models.gguf_export import GGUF_TYPES, export_refusal, gguf_file_name
from dschat.models.lora import LORA_ALPHA
from dschat.runtime import checkpoint
from dschat.runtime.errors import DschatError, FlagError
from dschat.runtime.logger import REPORTERS, resolve_report_to

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]



def add_data_args(p: argparse.ArgumentParser, step: int) -> None:
    """--data_path, --data_split, --data_output_path (and --sft_only_data_path for step 1)."""
    p.add_argument("--data_path", nargs="*", default=["dschat/builtin"],
                   help="Datasets: registered names (dschat/builtin, Dahoas/rm-static, ...), local/jsonfile, "
                        "or paths to .json/.jsonl(.gz) files or save_to_disk folders.")
    p.add_argument("--data_split", type=str, default="2,4,4",
                   help="Shares of every dataset for phases 1,2,3 (SFT, reward, PPO); e.g. 2,4,4 gives "
                        "phase 1 20%%, phase 2 40%%, phase 3 40%%.")
    p.add_argument("--data_output_path", type=str, default="/tmp/data_files/",
                   help="Node-local folder for the tokenised-data cache (Arrow, keyed by a hash of all settings).")
    p.add_argument("--prompt_format", choices=["auto", "dschat", "chat_template"], default="auto",
                   help="How prompts are written: auto (default) = the model's chat template when its tokenizer "
                        "has one, else DeepSpeed-Chat's 'Human: ... Assistant:' text; answers end with the "
                        "template's end-of-turn token (else the EOS). chat.py's --prompt_format means the same.")
    p.add_argument("--group_by_length", action="store_true",
                   help="Train on batches of rows of similar length (windows of 50 shuffled batches sorted by "
                        "length, the batches then shuffled; step 3: prompts), so less of each batch is padding. "
                        "Same rows per epoch, another order.")
    p.add_argument("--print_examples", type=int, default=0, metavar="N",
                   help="Print the first N training rows of this step's phase exactly as they will be tokenised "
                        "(special tokens shown, the loss-bearing tokens between [[ and ]]), then exit without "
                        "training.")
    if step == 1:
        p.add_argument("--sft_only_data_path", nargs="*", default=[],
                       help="Single-response datasets used only in phase 1.")


def add_padding_free_arg(p: argparse.ArgumentParser, what: str) -> None:
    """--padding_free / --no_padding_free (on by default)."""
    p.add_argument("--no_padding_free", dest="padding_free", action="store_false",
                   help="Run every forward padded (the rows of a batch padded to its longest, as before).")
    p.add_argument("--padding_free", dest="padding_free", action="store_true", default=True,
                   help=f"On by default. Run {what} padding-free: a batch's rows laid end to end in as few rows as fit (each row's "
                        "position ids restarting at 0, no attention across rows), so no forward computes padding; "
                        "equal to the padded forward up to float rounding. Used where the model hands its position "
                        "ids to transformers' create_causal_mask (Llama, Qwen, Mistral, GPT-2 and most current "
                        "families; not OPT) and runs sdpa or eager attention, else the padded forward runs. "
                        "--no_padding_free: always the padded forward.")


def add_model_args(p: argparse.ArgumentParser, lr: float, lr_help: str | None = None) -> None:
    """Model path, batch sizes, optimisation and schedule flags of steps 1 and 2."""
    p.add_argument("--model_name_or_path", type=str, default=BUILTIN_MODEL_DIR,
                   help="HF model directory, hub name, .gguf file, or 'builtin' (the default tiny Llama).")
    p.add_argument("--per_device_train_batch_size", type=int, default=16,
                   help="Rows per micro-batch on each rank (the global batch is this x ranks x accumulation).")
    p.add_argument("--per_device_eval_batch_size", type=int, default=16, help="Rows per evaluation batch on each rank.")
    p.add_argument("--max_seq_len", type=int, default=512,
                   help="Longest prompt+answer in tokens; batches are padded only to their own longest row.")
    p.add_argument("--learning_rate", type=float, default=lr, help=lr_help)
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW weight decay (biases and norm weights are never decayed).")
    p.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the training split.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step.")
    p.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULERS,
                   help="transformers' learning-rate schedule after the warmup.")
    add_optim_args(p, warmup=0)
    p.add_argument("--dropout", type=float, default=None,
                   help="Override the model's dropout rates (default: the model's own; DPO's policy: 0, no dropout).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in the backward pass (less memory, ~30%% more compute).")
    p.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3],
                   help="DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.")
    p.add_argument("--offload", action="store_true", help="ZeRO-Offload of optimizer state and parameters to CPU.")
    add_lora_args(p, "")


def add_optim_args(p: argparse.ArgumentParser, warmup: int, warmup_help: str = "") -> None:
    """--num_warmup_steps, --warmup_ratio and --max_grad_norm."""
    p.add_argument("--num_warmup_steps", type=int, default=warmup,
                   help=f"Learning-rate warmup in optimizer steps{warmup_help}; excludes --warmup_ratio.")
    p.add_argument("--warmup_ratio", type=float, default=None,
                   help="Warm up over this share of the run instead: ceil(ratio x total optimizer steps) steps "
                        "(TRL's and HF Trainer's flag); excludes an explicit --num_warmup_steps. Off by default.")
    p.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="Clip the global gradient norm to this before each optimizer step (DeepSpeed's "
                        "gradient_clipping, DeepSpeed-Chat's fixed 1.0); 0 turns clipping off.")


def add_lora_args(p: argparse.ArgumentParser, prefix: str) -> None:
    """--{prefix}lora_dim, _module_name, _target_modules, _alpha, _learning_rate (peft LoRA)."""
    who = f"the {prefix[:-1]}'s " if prefix else ""
    p.add_argument(f"--{prefix}lora_dim", type=int, default=0, help=f"LoRA rank r of {who}adapters; 0 disables LoRA.")
    p.add_argument(f"--{prefix}lora_module_name", type=str, default="layers.",
                   help="LoRA goes on every Linear whose module name contains this (DeepSpeed-Chat's "
                        "'decoder.layers.' is OPT-only; 'layers.' covers OPT and Llama).")
    p.add_argument(f"--{prefix}lora_target_modules", type=str, nargs="+", default=None, metavar="NAME",
                   help=f"peft's target_modules instead of --{prefix}lora_module_name: module names (q_proj v_proj: "
                        f"every Linear named so or ending in .NAME) or all-linear (every Linear but the output "
                        f"head). Default: --{prefix}lora_module_name's substring match.")
    p.add_argument(f"--{prefix}lora_alpha", type=float, default=LORA_ALPHA,
                   help="LoRA alpha: the adapters' update is scaled by alpha / r. The default 1 keeps "
                        "DeepSpeed-Chat's scale 1/r (peft's default alpha is 8; many recipes use 2 x r).")
    p.add_argument(f"--{prefix}lora_learning_rate", type=float, default=5e-4,
                   help="Learning rate of the LoRA weights (the other trained weights use the main one).")


def add_export_args(p: argparse.ArgumentParser, folder: str = "<output_dir>") -> None:
    """--export_gguf (steps 1, 3 and DPO: the causal LMs)."""
    p.add_argument("--export_gguf", choices=list(GGUF_TYPES), default=None,
                   help=f"Also write the saved model as {folder}/{gguf_file_name('<type>')} for llama.cpp and Ollama "
                        f"(tensor names, tokenizer, chat template; norms stay f32). Llama-family models with a "
                        f"byte-level BPE tokenizer only (builtin, SmolLM2): others are refused before training.")


def check_export_gguf(args: argparse.Namespace) -> None:
    """Refuse --export_gguf before training when the model it would write is no Llama (or not writable as GGUF)."""
    gguf_type = getattr(args, "export_gguf", None)
    if not gguf_type:
        return
    from dschat.models.loading import load_tokenizer, model_config

    flag = "actor_model_name_or_path" if hasattr(args, "actor_model_name_or_path") else "model_name_or_path"
    path = getattr(args, flag)
    trust = getattr(args, "trust_remote_code", False)
    try:
        config = model_config(path, trust)
        tokenizer = load_tokenizer(path, trust) if getattr(config, "model_type", None) == "llama" else None
    except DschatError:  # a missing or broken model: the step's loader names it
        return
    reason = export_refusal(config, tokenizer, f"--{flag} {path}")
    if reason:
        raise FlagError(f"--export_gguf {gguf_type}: {reason}")


def add_run_args(p: argparse.ArgumentParser, tb_default: str) -> None:
    """Output, seed, precision, logging, evaluation cadence, checkpoints and safety flags."""
    p.add_argument("--output_dir", type=str, default=None,
                   help="Where the trained model, dschat_args.json and checkpoints go. Required to train (refused "
                        "in one line before anything loads): a step's output is the next step's input, so it is "
                        "named, never a default folder that the next run would silently replace. Not needed "
                        "with --print_examples.")
    p.add_argument("--seed", type=int, default=1234, help="Seed of data order, sampling and fresh weights.")
    p.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    p.add_argument("--dtype", type=str, default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: bf16 on GPUs that support it, else fp32 (DeepSpeed-Chat defaults to fp16 and "
                        "has no fp32; fp16 is refused on CPU).")
    p.add_argument("--only_optimize_lora", action="store_true",
                   help="Train the LoRA adapters only (with a LoRA rank set); the base weights stay frozen.")
    p.add_argument("--compute_fp32_loss", action="store_true",
                   help="With bf16/fp16: compute step 1's loss and step 3's log-probs from fp32 logits "
                        "(DeepSpeed-Chat's meaning; fp32 runs always do, step 2 always scores in fp32).")
    p.add_argument("--report_to", nargs="+", choices=list(REPORTERS), default=None, metavar="{tensorboard,wandb,none}",
                   help="Where the training scalars go besides <output_dir>/metrics.jsonl (always written) and the "
                        "PNG plots: tensorboard (<output_dir>/<step>_tensorboard), wandb (WANDB_MODE=offline needs "
                        "no network), none. Default: tensorboard where it is installed.")
    p.add_argument("--enable_tensorboard", action="store_true",
                   help="DeepSpeed-Chat's switch: --report_to tensorboard, logged under --tensorboard_path (with "
                        "DeepSpeed's own TensorBoard logs).")
    p.add_argument("--tensorboard_path", type=str, default=tb_default,
                   help="TensorBoard log folder (with --enable_tensorboard).")
    p.add_argument("--add_eot_token", action="store_true",
                   help="Accepted for compatibility: every answer already ends with the tokenizer's EOS.")
    p.add_argument("--eval_interval", type=int, default=0, help="Also evaluate every N steps (0: epochs only).")
    p.add_argument("--eval_iters", type=int, default=100, help="At most this many eval batches per evaluation.")
    p.add_argument("--save_interval", type=int, default=0,
                   help="Write a resumable checkpoint every N steps to <output_dir>/checkpoints (0: never).")
    p.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in <output_dir>.")
    p.add_argument("--overwrite_checkpoints", action="store_true",
                   help="Start over although <output_dir>/checkpoints holds an earlier run's checkpoint: it is "
                        "deleted when this run starts (without this flag or --resume such a run is refused).")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Allow model code from the model directory to run (off by default).")
    p.add_argument("--max_bad_steps", type=int, default=5,
                   help="Stop after this many consecutive updates with a NaN/inf loss (each is skipped).")


def check_common_args(args: argparse.Namespace, model_dirs: tuple[str, ...] = ("",)) -> None:
    """Flag checks shared by all steps (batch sizes, LoRA, checkpoints, `model_dirs` under --output_dir)."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "per_device_generation_batch_size", "per_device_training_batch_size"):
        if getattr(args, name, 1) < 1:
            raise FlagError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    lora_dims = [getattr(args, k, 0) for k in ("lora_dim", "actor_lora_dim", "critic_lora_dim")]
    if getattr(args, "only_optimize_lora", False) and not any(lora_dims):
        raise FlagError("--only_optimize_lora needs LoRA: set --lora_dim (or --actor_lora_dim/--critic_lora_dim) > 0")
    for name in ("save_interval", "eval_interval"):
        if getattr(args, name, 0) < 0:
            raise FlagError(f"--{name} must be 0 (off) or positive (got {getattr(args, name)})")
    if getattr(args, "num_train_epochs", 1) < 1:
        raise FlagError(f"--num_train_epochs must be at least 1 (got {args.num_train_epochs}); a run that trains "
                        f"nothing would replace the output with an untrained model")
    if getattr(args, "max_bad_steps", 1) < 1:
        raise FlagError(f"--max_bad_steps must be at least 1 (got {args.max_bad_steps})")
    check_numbers(args)
    check_data_flags(args)
    if hasattr(args, "report_to"):
        args.report_to = resolve_report_to(args.report_to, getattr(args, "enable_tensorboard", False))
    if getattr(args, "print_examples", 0) < 0:
        raise FlagError(f"--print_examples must be 0 (off) or positive (got {args.print_examples})")
    check_export_gguf(args)
    if not getattr(args, "output_dir", None):
        for name in ("resume", "save_interval"):
            if getattr(args, name, None):
                raise FlagError(f"--{name} needs --output_dir (checkpoints live in <output_dir>/checkpoints)")
        return
    check_output_not_input(args)
    for sub in model_dirs:
        check_output_dir(f"{args.output_dir}/{sub}" if sub else args.output_dir)
    check_earlier_checkpoints(args)


def check_earlier_checkpoints(args: argparse.Namespace) -> None:
    """Refuse to start over an earlier run's checkpoint without --resume or --overwrite_checkpoints."""
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite_checkpoints", False)
    if resume and overwrite:
        raise FlagError("--resume continues from the last checkpoint, --overwrite_checkpoints deletes it: give one")
    found = checkpoint.latest(args.output_dir)
    if found is not None and not resume and not overwrite and not getattr(args, "print_examples", 0):
        raise FlagError(f"--output_dir {args.output_dir} holds a checkpoint of an earlier run ({found}); rerun with "
                        f"--resume to continue from it, or with --overwrite_checkpoints to delete it and start over")


# Flags that name a model a step reads (its --output_dir must stay clear of them).
MODEL_PATH_FLAGS = ("model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path")
AT_LEAST_ONE = ("eval_iters", "max_new_tokens", "max_answer_seq_len", "max_prompt_seq_len", "max_seq_len")


def check_numbers(args: argparse.Namespace) -> None:
    """Learning rates, dropouts, LoRA ranks, weight decays, lengths and sampling flags in their valid ranges."""
    for name, value in sorted(vars(args).items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if name.endswith("learning_rate") and not (math.isfinite(value) and value > 0):
            raise FlagError(f"--{name} must be a finite number > 0 (got {value})")
        if name.endswith("dropout") and not 0 <= value < 1:
            raise FlagError(f"--{name} must be in [0, 1) (got {value})")
        if name.endswith("lora_dim") and value < 0:
            raise FlagError(f"--{name} must be 0 (no LoRA) or positive (got {value})")
        if name.endswith("weight_decay") and not (math.isfinite(value) and value >= 0):
            raise FlagError(f"--{name} must be a finite number >= 0 (got {value})")
    for name in AT_LEAST_ONE:
        if getattr(args, name, 1) < 1:
            raise FlagError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    seed = getattr(args, "seed", 0)
    if seed is not None and not 0 <= seed < 2**32:
        raise FlagError(f"--seed must be in [0, 2**32 - 1] (got {seed})")
    if getattr(args, "num_warmup_steps", 0) < 0:
        raise FlagError(f"--num_warmup_steps must be 0 or positive (got {args.num_warmup_steps})")
    ratio = getattr(args, "warmup_ratio", None)
    if ratio is not None and not 0 <= ratio <= 1:
        raise FlagError(f"--warmup_ratio must be in [0, 1] (got {ratio})")
    norm = getattr(args, "max_grad_norm", 1.0)
    if not (math.isfinite(norm) and norm >= 0):
        raise FlagError(f"--max_grad_norm must be a finite number >= 0 (0: no clipping; got {norm})")
    for name, value in sorted(vars(args).items()):
        if name.endswith("lora_alpha") and not (math.isfinite(value) and value > 0):
            raise FlagError(f"--{name} must be a finite number > 0 (got {value})")
        if name.endswith("lora_target_modules") and value and "all-linear" in value and len(value) > 1:
            raise FlagError(f"--{name}: all-linear stands alone (got {' '.join(value)})")
    temperature = getattr(args, "temperature", 1.0)
    if not (math.isfinite(temperature) and temperature > 0):
        raise FlagError(f"--temperature must be a finite number > 0 (got {temperature})")
    top_p = getattr(args, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise FlagError(f"--top_p must be in (0, 1] (got {top_p})")
    margin = getattr(args, "margin", 0.0)
    if not math.isfinite(margin):
        raise FlagError(f"--margin must be a finite number (got {margin})")
    if margin and getattr(args, "loss", "pairwise") == "divergence":
        raise FlagError("--margin: --loss divergence has no margin (use --loss pairwise)")


def check_data_flags(args: argparse.Namespace) -> None:
    """--data_split finite shares, no dataset listed twice, a --data_output_path that can be a folder."""
    split = getattr(args, "data_split", None)
    if split is not None:
        parts = split.split(",")
        for part in parts:
            try:
                finite = math.isfinite(float(part))
            except ValueError:
                continue  # parse_split names the malformed value
            if not finite:
                raise FlagError(f"--data_split '{split}': every share must be a finite number (got {part.strip()})")
        parse_split(split)
    for flag in ("data_path", "sft_only_data_path"):
        seen: dict[str, str] = {}
        for entry in getattr(args, flag, None) or []:
            key = "dschat/builtin" if entry in BUILTIN_NAMES else os.path.realpath(entry) if os.path.exists(entry) \
                else entry
            if key in seen:
                same = "" if seen[key] == entry else f" (as {seen[key]} and {entry})"
                raise FlagError(f"--{flag} lists {entry} twice{same}: its rows would be used twice; give each "
                                f"dataset once")
            seen[key] = entry
    cache = getattr(args, "data_output_path", None)
    if cache:
        base = nearest_existing(Path(cache))
        if not base.is_dir():
            where = "is a file" if base == Path(os.path.abspath(cache)) else f"lies under the file {base}"
            raise FlagError(f"--data_output_path {cache} {where}; the tokenised-data cache must be a folder")


def check_output_not_input(args: argparse.Namespace) -> None:
    """Refuse an --output_dir that is, contains or lies inside an input model folder (real paths compared)."""
    out = Path(args.output_dir).expanduser().resolve()
    for flag in MODEL_PATH_FLAGS:
        value = getattr(args, flag, None)
        if not value:
            continue
        try:
            path = Path(resolve_model_name(value)).expanduser()
        except DschatError:  # e.g. a packaged model that is not installed: the loader says so
            continue
        if not path.exists():
            continue
        folder = (path.parent if path.is_file() else path).resolve()  # a .gguf file: its folder
        if out == folder:
            relation = "is"
        elif folder in out.parents:
            relation = "lies inside"
        elif out in folder.parents:
            relation = "contains"
        else:
            continue
        raise FlagError(f"--output_dir {args.output_dir} {relation} the input model folder of --{flag} "
                        f"({value}); saving there would replace the model this step reads: use another folder")
