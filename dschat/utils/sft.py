"""Step 1 (supervised fine-tuning) as named stages that training/step1_supervised_finetuning/main.py calls."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from dschat.utils import dist
from dschat.utils.data.builtin_task import heldout_prompts
from dschat.utils.data.collators import SFTCollator
from dschat.utils.data.data_utils import load_phase_data
from dschat.utils.ds_utils import get_train_ds_config
from dschat.utils.evaluation import judge_eval, perplexity
from dschat.utils.loop import train_epochs
from dschat.utils.model.model_utils import create_hf_model, load_tokenizer
from dschat.utils.model.save import save_hf_model
from dschat.utils.training import (
    Logger,
    apply_lora,
    build_engine,
    device,
    make_loader,
    setup,
    steps_per_epoch,
    torch_dtype,
)


def data_settings(args: argparse.Namespace, phase: int) -> dict:
    """The settings that decide a phase's tokenised data (and its cache key)."""
    return {"data_path": list(args.data_path), "data_split": args.data_split, "phase": phase, "seed": args.seed,
            "sft_only_data_path": list(getattr(args, "sft_only_data_path", [])),
            "max_seq_len": getattr(args, "max_seq_len", 512),
            "max_prompt_len": getattr(args, "max_prompt_seq_len", 256),
            "train_on_prompt": getattr(args, "train_on_prompt", False)}


def uses_builtin_data(args: argparse.Namespace) -> bool:
    """Whether the builtin task is among the datasets (then the judge can score answers)."""
    return any(p in ("dschat/builtin", "builtin") for p in args.data_path)


def lm_loss(engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over label tokens, from fp32 logits."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)
    return loss, {"tokens": float(batch["attention_mask"].sum())}


class SFTRun:
    """Tokenizer, data, model engine and evaluation of one supervised fine-tuning run."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dtype = setup(args)
        self.dev = device()
        self.tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        data = load_phase_data(data_settings(args, 1), self.tokenizer, args.data_output_path)
        collator = SFTCollator(self.tokenizer.pad_token_id)
        self.train_loader = make_loader(data["train"], collator, args.per_device_train_batch_size, True, args.seed)
        self.eval_loader = make_loader(data["eval"], collator, args.per_device_eval_batch_size, False, args.seed)
        ds_config = get_train_ds_config(args.offload, self.dtype, args.zero_stage, args.per_device_train_batch_size,
                                        args.gradient_accumulation_steps, dist.world_size(),
                                        args.enable_tensorboard, args.tensorboard_path, "step1_model")
        model = create_hf_model(AutoModelForCausalLM, args.model_name_or_path, self.tokenizer, ds_config,
                                torch_dtype(self.dtype), args.dropout, args.gradient_checkpointing,
                                args.trust_remote_code)
        if args.lora_dim > 0:
            model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
        total = args.num_train_epochs * steps_per_epoch(self.train_loader, args.gradient_accumulation_steps)
        self.engine = build_engine(model, ds_config, args.learning_rate, args.weight_decay,
                                   args.lora_learning_rate, args.lr_scheduler_type, args.num_warmup_steps, total)
        tb = f"{args.tensorboard_path}/step1_tensorboard" if args.enable_tensorboard else None
        self.logger = Logger(total, "step1 SFT", tb)
        self.prompts = heldout_prompts(n=args.num_judge_prompts) if uses_builtin_data(args) else []
        self.history: list[dict] = []
        self.start = time.time()

    def evaluate(self, when: str) -> dict:
        """Eval-split perplexity and, on the builtin task, the judge score of greedy held-out answers."""
        metrics = perplexity(self.engine, self.eval_loader, self.args.eval_iters, self.dev)
        if self.prompts:
            synced = self.args.zero_stage == 3 and dist.world_size() > 1
            result = judge_eval(self.engine.module, self.tokenizer, self.prompts, self.args.max_new_tokens,
                                self.dev, synced)
            metrics["judge"] = result["judge"]
            for prompt, answer in result["examples"][:2]:
                self.logger.write(f"  {prompt!r} -> {answer!r}")
        metrics["when"] = when
        self.history.append(metrics)
        self.logger.scalars(self.engine.global_steps, {f"eval/{k}": v for k, v in metrics.items() if k != "when"})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "when")
        self.logger.write(f"[eval {when}] {shown}")
        return metrics

    def train(self) -> None:
        """All epochs, with the periodic evaluations and checkpoints the flags ask for."""
        self.result = train_epochs(self.engine, self.train_loader, lm_loss, self.evaluate, self.args,
                                   self.logger, self.dev, shown=("loss",), history=self.history)
        self.logger.close()

    def save(self) -> None:
        """The fine-tuned model as a plain HF directory in --output_dir, with its eval history."""
        if self.args.output_dir:
            save_hf_model(self.engine, self.tokenizer, self.args.output_dir,
                          {"dschat_metrics.json": {"step": 1, "evals": self.history, **self.result,
                                                   "wall_time_s": time.time() - self.start}})

    def summary(self) -> str:
        """Final lines: perplexity and judge before and after training."""
        first, last = self.history[0], self.history[-1]
        lines = [f"step 1 done in {time.time() - self.start:.0f}s: perplexity {first['perplexity']:.2f} -> "
                 f"{last['perplexity']:.2f}"]
        if "judge" in last:
            lines.append(f"judge score on {len(self.prompts)} held-out prompts: untrained {first['judge']:.3f}, "
                         f"SFT {last['judge']:.3f}")
        if self.args.output_dir:
            lines.append(f"model saved to {self.args.output_dir}")
        return "\n".join(lines)
