"""The skeleton every step's run shares (`Run`: process set-up, tokenizer and prompt format, cached phase data,
the evaluation history and its logging, the "nothing trained" rule, the saved metrics), and the run of steps 1
and 2 (and DPO) on it: one trained model on one phase's data (`OneModelRun`).

A OneModelRun subclass says which phase and collator it uses, how to build its model and what its loss is; the
class does the rest: loaders, DeepSpeed config and engine (LoRA included), progress bar, the shared epoch loop
(trainers/loop.py, which also owns resume and checkpoints for every step). Step 3 (trainers/ppo_run.RLHFRun) is
the other Run. The argparse Namespace stops here: below this, functions get what they need by name.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from dschat.data.builtin_task import heldout_prompts
from dschat.data.loaders import make_loader, steps_per_epoch
from dschat.data.phases import BUILTIN_NAMES, DataSettings, load_phase_data
from dschat.data.prompts import PromptFormat, carry_template
from dschat.models.card import model_card
from dschat.models.export import save_hf_model
from dschat.models.loading import load_tokenizer
from dschat.models.lora import apply_lora
from dschat.runtime import dist
from dschat.runtime.accumulation import check_accumulation
from dschat.runtime.ds_config import get_train_ds_config
from dschat.runtime.engine import build_engine, device, offload_note, setup, torch_dtype, warmup_steps
from dschat.runtime.errors import NothingTrainedError
from dschat.runtime.logger import METRICS_FILE, Logger
from dschat.trainers.evaluation import judge_eval
from dschat.trainers.loop import LoopSettings, check_resume, loop_key, train_epochs


def data_key(settings: DataSettings) -> dict[str, Any]:
    """The data part of a resume key: sources (local paths absolute, the builtin task by one name), split, lengths
    and format; not the seed and phase, which the loop's key and the step fix."""
    def where(path: str) -> str:
        return "dschat/builtin" if path in BUILTIN_NAMES else os.path.abspath(path) if os.path.exists(path) else path

    key = settings.key()
    return {k: v for k, v in key.items() if k not in ("seed", "phase")} | {
        "data_path": [where(p) for p in settings.data_path],
        "sft_only_data_path": [where(p) for p in settings.sft_only_data_path]}


def lora_key(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The LoRA part of a resume key: adapters added, dropped or reshaped change the checkpoint's weights."""
    dim = getattr(args, f"{prefix}lora_dim", 0)
    return {f"{prefix}lora_dim": dim} | ({f"{prefix}lora_module_name": getattr(args, f"{prefix}lora_module_name", ""),
                                           f"{prefix}lora_target_modules": getattr(args, f"{prefix}lora_target_modules",
                                                                                   None)} if dim > 0 else {})


def loop_settings(args: argparse.Namespace, run_key: dict[str, Any] | None = None) -> LoopSettings:
    """The shared loop's settings from a step's flags (`run_key`: what the run trains, for --resume's check)."""
    return LoopSettings(num_train_epochs=args.num_train_epochs,
                        per_device_train_batch_size=args.per_device_train_batch_size,
                        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed,
                        max_bad_steps=args.max_bad_steps, eval_interval=args.eval_interval,
                        save_interval=args.save_interval, output_dir=args.output_dir, resume=args.resume,
                        print_loss=getattr(args, "print_loss", False), run_key=run_key or {})


class Run:
    """What every step's run shares: set-up, tokenizer and format, phase data, evaluation history, saved metrics."""

    name: str = "step"

    def __init__(self, args: argparse.Namespace, model_path: str, padding_side: str = "right"):
        self.args, self.start = args, time.time()
        self.dtype = setup(args.dtype, args.seed)
        self.dev = device()
        note = offload_note(vars(args))
        if note:
            dist.print_rank0(note)
        self.tokenizer = load_tokenizer(model_path, args.trust_remote_code, padding_side=padding_side)
        self.fmt = PromptFormat.create(self.tokenizer, args.prompt_format)
        carry_template(self.tokenizer, self.fmt.kind)  # the saved model carries the format it was trained in
        self.history: list[dict[str, Any]] = []
        self.logger: Logger | None = None  # made by the subclass once it knows how many steps the run has

    def load_data(self, settings: DataSettings) -> dict[str, Any]:
        """This step's phase data ({"train", "eval"} datasets) from the tokenising cache."""
        self.data_settings = settings
        data = load_phase_data(settings, self.tokenizer, self.args.data_output_path)
        self.data_counts = {split: len(data[split]) for split in ("train", "eval") if split in data}  # all ranks
        return data

    def global_step(self) -> int:
        """The step an evaluation is logged at."""
        raise NotImplementedError

    def record(self, metrics: dict[str, Any], when: str) -> dict[str, Any]:
        """Append an evaluation to the history, log its numbers to TensorBoard and as one line."""
        metrics["when"] = when
        self.history.append(metrics)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float)}
        self.logger.scalars(self.global_step(), {f"eval/{k}": v for k, v in numbers.items()})
        self.logger.write(f"[eval {when}] " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))
        return metrics

    def make_logger(self, total: int, desc: str, tb_name: str) -> Logger:
        """The run's Logger: <output_dir>/metrics.jsonl always (a --resume appends), TensorBoard and wandb as
        --report_to says (TensorBoard in --tensorboard_path/<tb_name> with --enable_tensorboard, else in
        <output_dir>/<tb_name>; wandb's files in <output_dir>/wandb)."""
        a, out = self.args, self.args.output_dir
        report = getattr(a, "report_to", None) or []
        tb_root = a.tensorboard_path if a.enable_tensorboard else out
        config = {k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        return Logger(total, desc, f"{tb_root}/{tb_name}" if "tensorboard" in report and tb_root else None,
                      metrics_path=f"{out}/{METRICS_FILE}" if out else None, append=bool(a.resume),
                      wandb_dir=out if "wandb" in report and out else None, wandb_config=config)

    def card(self, metrics: dict[str, Any] | None, folder: str, role: str = "", seq_cls: bool = False) -> str:
        """The model card (README.md) of a model this run saves in `folder`."""
        return model_card(self.name, vars(self.args), metrics, role=role, seq_cls=seq_cls, folder=folder,
                          counts=getattr(self, "data_counts", None))

    def require_trained(self, trained: bool, why: str) -> None:
        """NothingTrainedError (nothing is saved) when the run applied no update; `why` says what it tried."""
        if not trained:
            raise NothingTrainedError(f"{self.name}: no update was applied ({why}); nothing was trained, so nothing "
                                      f"is saved")

    def run_metrics(self, step: int, **extra: Any) -> dict[str, Any]:
        """The dschat_metrics.json of a saved model: the step, every evaluation, `extra`, the wall time."""
        return {"step": step, "evals": self.history, **extra, "wall_time_s": time.time() - self.start}


class OneModelRun(Run):
    """Tokenizer, phase data, loaders, one DeepSpeed engine and its training loop."""

    phase: int = 1
    shown: tuple[str, ...] = ("loss",)

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, args.model_name_or_path)
        data = self.load_data(DataSettings(
            data_path=tuple(args.data_path), data_split=args.data_split, phase=self.phase, seed=args.seed,
            sft_only_data_path=tuple(getattr(args, "sft_only_data_path", ()) if self.phase == 1 else ()),
            max_seq_len=args.max_seq_len, train_on_prompt=getattr(args, "train_on_prompt", False),
            last_turn_only=getattr(args, "last_turn_only", False), prompt_format=self.fmt.kind))
        self.collator = self.make_collator()
        self.train_loader = make_loader(data["train"], self.collator, args.per_device_train_batch_size, True,
                                        args.seed, group_by_length=args.group_by_length)
        note = check_accumulation(len(self.train_loader), args.num_train_epochs, args.gradient_accumulation_steps)
        if note:
            dist.print_rank0(note)
        self.eval_loader = make_loader(data["eval"], self.collator, args.per_device_eval_batch_size, False,
                                       args.seed)
        self.loop = loop_settings(args, data_key(self.data_settings) | lora_key(args)
                                  | {"only_optimize_lora": bool(args.lora_dim and args.only_optimize_lora)})
        if args.resume:  # a corrupt checkpoint or one of another run is refused before any model is built
            check_resume(args.output_dir, loop_key(self.train_loader, self.loop))
        tb = args.tensorboard_path if args.enable_tensorboard else None
        ds_config = get_train_ds_config(stage=args.zero_stage, dtype=self.dtype,
                                        micro_batch=args.per_device_train_batch_size, world_size=dist.world_size(),
                                        grad_accum=args.gradient_accumulation_steps, offload=args.offload,
                                        tensorboard_path=tb, tb_name=f"{self.name}_model",
                                        gradient_clipping=args.max_grad_norm)
        model = self.build_model(ds_config, torch_dtype(self.dtype))
        if args.lora_dim > 0:
            model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora,
                               keep_trainable=self.keep_trainable(model), alpha=args.lora_alpha,
                               target_modules=args.lora_target_modules)
        self.total_steps = args.num_train_epochs * steps_per_epoch(self.train_loader, args.gradient_accumulation_steps)
        self.engine = build_engine(model, ds_config, args.learning_rate, args.weight_decay, args.lora_learning_rate,
                                   args.lr_scheduler_type,
                                   warmup_steps(args.num_warmup_steps, args.warmup_ratio, self.total_steps),
                                   self.total_steps)
        self.logger = self.make_logger(self.total_steps, self.description(), f"{self.name}_tensorboard")
        # Held-out builtin prompts whose greedy answers the judge scores (steps with --num_judge_prompts).
        n_judge = getattr(args, "num_judge_prompts", 0)
        self.prompts = heldout_prompts(n=n_judge) if self.data_settings.uses_builtin and n_judge else []
        self.result: dict[str, Any] = {}

    # --- what a step fills in -------------------------------------------------------------------------------
    def make_collator(self):
        """The collator of this step's batches."""
        raise NotImplementedError

    def build_model(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The model to train (loaded inside zero.Init under ZeRO-3)."""
        raise NotImplementedError

    def keep_trainable(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Modules that stay fully trainable under LoRA (a reward model's head)."""
        return ()

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, scalars to log) of one batch."""
        raise NotImplementedError

    def evaluate(self, when: str) -> dict[str, Any]:
        """Evaluate the current model, append to the history and log it."""
        raise NotImplementedError

    def description(self) -> str:
        """Progress-bar label."""
        return self.name

    # --- shared ---------------------------------------------------------------------------------------------
    def global_step(self) -> int:
        """The engine's optimizer steps."""
        return self.engine.global_steps

    def judge(self) -> dict[str, float]:
        """{"judge": mean judge score of greedy answers to the held-out prompts} ({} off the builtin task)."""
        if not self.prompts:
            return {}
        synced = self.args.zero_stage == 3 and dist.world_size() > 1
        result = judge_eval(self.engine.module, self.fmt, self.prompts, self.args.max_new_tokens, self.dev, synced)
        for prompt, answer in result["examples"][:2]:
            self.logger.write(f"  {prompt!r} -> {answer!r}")
        return {"judge": result["judge"], "answers": [list(x) for x in result["examples"][:3]]}

    def train(self) -> None:
        """All epochs, with the periodic evaluations and checkpoints the flags ask for."""
        self.result = train_epochs(self.engine, self.train_loader, self.loss, self.evaluate, self.loop,
                                   self.logger, self.dev, shown=self.shown, history=self.history)
        self.logger.close()
        self.require_trained(self.result["applied_micro_batches"] > 0 or self.engine.global_steps > 0,
                             f"--num_train_epochs {self.args.num_train_epochs}, {self.result['skipped_updates']} "
                             f"skipped as non-finite")

    def save_model(self, step: int, extra_json: dict[str, Any] | None = None) -> None:
        """The trained model as a plain HF directory in --output_dir with its metrics (and `extra_json`)."""
        if self.args.output_dir:
            metrics = self.run_metrics(step, **self.result)
            card = self.card(metrics, self.args.output_dir, seq_cls=self.name == "step2")
            save_hf_model(self.engine, self.tokenizer, self.args.output_dir,
                          {"dschat_metrics.json": metrics, "README.md": card} | (extra_json or {}),
                          gguf_type=getattr(self.args, "export_gguf", None))
