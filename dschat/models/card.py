"""The model card (README.md) every saved model folder gets: what it is, what it came from, how it scored."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import dschat
from dschat.models.export import CARD_MARK

# What each step's run trained (Run.name -> words), and which transformers class loads its folder.
ALGORITHMS = {"step1": "Step 1: supervised fine-tuning (SFT) on prompt + chosen answer",
              "step2": "Step 2: reward model (sequence classifier, one score per answer) on chosen/rejected pairs",
              "step2_dpo": "DPO (direct preference optimisation) on chosen/rejected pairs",
              "step 3": "Step 3: RLHF of the step-1 actor"}
# The flags a reader wants first (all of them are in dschat_args.json beside the model).
KEY_FLAGS = ("learning_rate", "actor_learning_rate", "critic_learning_rate", "num_train_epochs",
             "per_device_train_batch_size", "per_device_generation_batch_size", "per_device_training_batch_size",
             "gradient_accumulation_steps", "max_seq_len", "max_prompt_seq_len", "max_answer_seq_len",
             "lr_scheduler_type", "warmup_ratio", "weight_decay", "max_grad_norm", "loss", "loss_type", "beta",
             "advantage_estimator", "policy_loss", "loss_agg_mode", "reward_fn", "n_samples_per_prompt", "ppo_epochs",
             "init_kl_coef", "kl_estimator", "lora_dim", "actor_lora_dim", "critic_lora_dim", "lora_alpha",
             "actor_lora_alpha", "only_optimize_lora", "zero_stage", "actor_zero_stage", "dtype", "prompt_format",
             "seed")
BASE_LINE = "- **Base model**:"
LICENCES = {"smollm2": "Apache-2.0 (SmolLM2, HuggingFaceTB)", "dschat/builtin": "the dschat package's own tiny model",
            "builtin": "the dschat package's own tiny model", "tiny-llama": "the dschat package's own tiny model"}


def base_model(flags: dict[str, Any], seq_cls: bool = False) -> str:
    """The model the run started from (--model_name_or_path, --actor_model_name_or_path, or for a sequence
    classifier of step 3 (the critic) --critic_model_name_or_path)."""
    critic = flags.get("critic_model_name_or_path") if seq_cls else None
    return str(critic or flags.get("model_name_or_path") or flags.get("actor_model_name_or_path") or "unknown")


def origin(base: str) -> str | None:
    """The base-model line of the card in `base` when it is a model dschat trained (its own base, licence)."""
    try:
        lines = (Path(base) / "README.md").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or lines[0].strip() != CARD_MARK:
        return None
    return next((line.split(BASE_LINE, 1)[1].strip() for line in lines if line.startswith(BASE_LINE)), None)


def licence(base: str) -> str | None:
    """The base model's licence where dschat knows it (SmolLM2: Apache-2.0), else None."""
    low = base.lower()
    return next((text for key, text in LICENCES.items() if key in low), None)


def algorithm(step: str, flags: dict[str, Any], role: str = "") -> str:
    """One line: the step and its algorithm (estimator, policy loss, rewards for step 3; loss for steps 2 and DPO)."""
    text = ALGORITHMS.get(step, step)
    if step == "step 3":
        text += (f", advantage estimator {flags.get('advantage_estimator')}, policy loss {flags.get('policy_loss')}, "
                 f"rewards {' + '.join(map(str, flags.get('reward_fn') or []))}")
    elif step == "step2_dpo":
        text += f", loss {flags.get('loss_type')}, beta {flags.get('beta')}"
    elif step == "step2":
        text += f", {flags.get('loss')} loss"
    return text + (f" ({role})" if role else "")


def _fmt(value: Any) -> str:
    """A flag or metric value for a Markdown table."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value).replace("|", "\\|")


def eval_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, first evaluation's value, last's) for every number of the held-out evaluations."""
    evals = [e for e in metrics.get("evals", []) if isinstance(e, dict)]
    if not evals:
        return []
    first, last = evals[0], evals[-1]
    keys = dict.fromkeys([*first, *last])
    return [(k, first.get(k), last.get(k)) for k in keys
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first.get(k), last.get(k)))]


def model_card(step: str, flags: dict[str, Any], metrics: dict[str, Any] | None = None, role: str = "",
               seq_cls: bool = False, folder: str = "", counts: dict[str, int] | None = None) -> str:
    """README.md text of a saved model: base model and licence, algorithm, data (paths, split, `counts` of rows
    per split), key flags, held-out metrics (first and last evaluation), how to load and chat with it, date and
    dschat version."""
    metrics = metrics or {}
    base = base_model(flags, seq_cls)
    earlier = origin(base)  # a step's output: name what it was trained from (and that model's licence)
    lic = None if earlier else licence(base)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = folder.rstrip("/").split("/")[-1] if folder else "model"
    lines = [CARD_MARK, f"# {name}", "",
             f"Trained with dschat {dschat.__version__} on {now}.", "",
             f"{BASE_LINE} {base}" + (f" (licence: {lic})" if lic else "") + (f", trained from {earlier}" if earlier else ""),
             f"- **Algorithm**: {algorithm(step, flags, role)}",
             f"- **Data**: {_fmt(flags.get('data_path', []))} (split {flags.get('data_split', '-')}"
             + "".join(f"; {n} {split} rows" for split, n in (counts or {}).items()) + ")",
             "", "## Key flags", "", "| flag | value |", "|---|---|"]
    lora = any(flags.get(k) for k in ("lora_dim", "actor_lora_dim", "critic_lora_dim"))
    lines += [f"| --{k} | {_fmt(flags[k])} |" for k in KEY_FLAGS
              if flags.get(k) is not None and flags[k] is not False and flags[k] not in ("", [], ())
              and (lora or "lora" not in k)]
    lines += ["", "All flags: `dschat_args.json` (in the step's output folder); repeat the run with "
              "`--config dschat_args.json`.", ""]
    rows = eval_rows(metrics)
    if rows:
        evals = metrics["evals"]
        lines += ["## Held-out evaluation", "",
                  f"| metric | first ({evals[0].get('when', 'start')}) | last ({evals[-1].get('when', 'end')}) |",
                  "|---|---|---|"]
        lines += [f"| {k} | {_fmt(a) if a is not None else '-'} | {_fmt(b) if b is not None else '-'} |"
                  for k, a, b in rows]
        lines += ["", "Every evaluation is in `dschat_metrics.json`; training curves in `metrics.jsonl` and "
                  "`training_curves.png` of the step's output folder.", ""]
    cls = "AutoModelForSequenceClassification" if seq_cls else "AutoModelForCausalLM"
    lines += ["## Use", "", "```python", f"from transformers import AutoTokenizer, {cls}",
              f'model = {cls}.from_pretrained("{folder or "."}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{folder or "."}")', "```", ""]
    if not seq_cls:
        lines += ["Chat with it (the tokenizer carries the chat template it was trained with):", "",
                  f"    python chat.py --path {folder or '.'}", ""]
    return "\n".join(lines)
