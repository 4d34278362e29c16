"""The four training steps' flags and bodies: training/*/main.py and `dschat sft|rm|dpo|ppo` run these.

Every parser goes through entry.parse_step_args (DeepSpeed's flags, --config FILE, the help format with
defaults) and every run through entry.run_step (evaluate, train, save, dschat_args.json, summary).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from dschat.algos.losses import DPO_LOSS_KINDS
from dschat.cli.args import (
    SCHEDULERS,
    add_data_args,
    add_export_args,
    add_lora_args,
    add_model_args,
    add_optim_args,
    add_padding_free_arg,
    add_run_args,
    check_common_args,
)
from dschat.cli.entry import parse_step_args, require_output_dir, run_step
from dschat.cli.examples import print_examples
from dschat.cli.outdir import claim_output_dir
from dschat.cli.rlhf_args import add_ppo_args, check_rlhf_args, set_step3_help
from dschat.runtime.errors import FlagError

SFT_DOC = "Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer (DeepSpeed-Chat flags)."
RM_DOC = """Step 2: reward model fine-tuning on chosen/rejected pairs (DeepSpeed-Chat flags).

The reward model is AutoModelForSequenceClassification (num_labels=1) started from a causal LM (normally
step 1's output via --model_name_or_path); the output folder loads with transformers alone.
"""
DPO_DOC = """Step 2 alternative: DPO (direct preference optimisation) of a causal LM on chosen/rejected pairs.

The policy starts from --model_name_or_path (normally step 1's output) and a frozen copy of the same model
is the reference; no reward model and no step 3. The output folder is a plain causal LM that loads with
transformers alone (and chat.py --path).
"""
PPO_DOC = "Step 3: PPO RLHF with actor, reference, critic and reward engines (DeepSpeed-Chat flags)."

RM_LR_HELP = ("Learning rate. The default 1e-3 suits the builtin tiny model (5 epochs); DeepSpeed-Chat's 5e-5 "
              "is for 350M+ pretrained models: use ~5e-5..1e-5 (and 1 epoch) for those, as the scripts do.")
DPO_LR_HELP = ("Learning rate. The default 5e-4 suits the builtin tiny model; DeepSpeed-Chat-scale (350M+) "
               "pretrained models use ~1e-6..5e-7 for DPO.")


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """--print_loss, --num_judge_prompts, --max_new_tokens (steps 1 and DPO)."""
    p.add_argument("--print_loss", action="store_true", help="Print the loss of every step.")
    p.add_argument("--num_judge_prompts", type=int, default=64,
                   help="Held-out builtin prompts answered greedily and scored by the judge at each eval.")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Answer length for judge evaluation.")


def sft_parser() -> argparse.ArgumentParser:
    """Step-1 flags: DeepSpeed-Chat's, plus evaluation, checkpoint and safety flags."""
    p = argparse.ArgumentParser(description=SFT_DOC)
    add_data_args(p, step=1)
    add_model_args(p, lr=1e-3, lr_help="Learning rate of the trained weights.")
    add_run_args(p, tb_default="step1_tensorboard")
    add_padding_free_arg(p, "the training and perplexity forwards")
    add_export_args(p)
    p.add_argument("--eot_token", type=str, default="<|endoftext|>",
                   help="Accepted for compatibility; the tokenizer's own EOS ends every answer.")
    p.add_argument("--train_on_prompt", action="store_true",
                   help="Loss on prompt and answer tokens, as DeepSpeed-Chat does (default: answer only).")
    p.add_argument("--last_turn_only", action="store_true",
                   help="On 'messages' conversations: loss on the last assistant turn only (default: on every "
                        "assistant turn; user and system turns never carry loss).")
    add_judge_args(p)
    return p


def rm_parser() -> argparse.ArgumentParser:
    """Step-2 flags: DeepSpeed-Chat's, plus loss choice, evaluation, checkpoint and safety flags."""
    p = argparse.ArgumentParser(description=RM_DOC)
    add_data_args(p, step=2)
    add_model_args(p, lr=1e-3, lr_help=RM_LR_HELP)
    add_run_args(p, tb_default="step2_tensorboard")
    add_padding_free_arg(p, "the reward model's forwards (with --pair_forward shared: the shared-prompt pair rows)")
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for compatibility and ignored: sequence ends come from the attention mask, "
                        "so OPT's leading pad-id BOS needs no special case.")
    p.add_argument("--loss", choices=["pairwise", "divergence"], default="pairwise",
                   help="pairwise: -logsigmoid(end score chosen - rejected - margin) (InstructGPT); "
                        "divergence: DeepSpeed-Chat's per-token loss over the span where the answers differ.")
    p.add_argument("--margin", type=float, default=0.0,
                   help="Margin of the pairwise loss (--loss divergence has none: a margin with it is refused).")
    p.add_argument("--pair_forward", choices=["auto", "shared", "separate"], default="auto",
                   help="shared: one forward per pair over [prompt, chosen answer, rejected answer] with a block "
                        "attention mask, so the shared prompt runs once (same values up to rounding); separate: "
                        "chosen and rejected as two sequences (DeepSpeed-Chat); auto: shared when a check on the "
                        "first batch agrees with separate, else separate.")
    p.set_defaults(num_train_epochs=5)  # DeepSpeed-Chat: 1, for large pretrained models
    return p


def check_dpo_args(args: argparse.Namespace) -> None:
    """The shared flag checks plus DPO's own."""
    check_common_args(args)
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise FlagError(f"--beta must be a finite number > 0 (got {args.beta})")
    for name, least in (("num_judge_prompts", 0), ("max_new_tokens", 1)):
        if getattr(args, name) < least:
            raise FlagError(f"--{name} must be at least {least} (got {getattr(args, name)})")


def dpo_parser() -> argparse.ArgumentParser:
    """DPO flags: step 2's data/model/run flags (DeepSpeed-Chat names) plus --beta, --loss_type and judge eval."""
    p = argparse.ArgumentParser(description=DPO_DOC)
    add_data_args(p, step=2)
    add_model_args(p, lr=5e-4, lr_help=DPO_LR_HELP)
    add_run_args(p, tb_default="step2_dpo_tensorboard")
    add_padding_free_arg(p, "the policy's and reference's forwards")
    add_export_args(p)
    p.add_argument("--beta", type=float, default=0.1,
                   help="Strength of the pull towards the reference (implicit reward = beta * log-ratio).")
    p.add_argument("--loss_type", choices=list(DPO_LOSS_KINDS), default="sigmoid",
                   help="sigmoid: -logsigmoid(beta * h) (DPO); ipo: (h - 1/(2 beta))^2 (IPO); h = the chosen "
                        "minus the rejected answer's log-ratio to the reference (summed over answer tokens).")
    p.add_argument("--no_shared_base", action="store_true",
                   help="With --lora_dim and --only_optimize_lora the reference is the policy with its adapters "
                        "off (no second copy of the model); this flag builds a separate frozen copy instead.")
    add_judge_args(p)
    return p


def ppo_parser() -> argparse.ArgumentParser:
    """Every DeepSpeed-Chat step-3 flag, plus its hard-coded PPO constants and our additions."""
    p = argparse.ArgumentParser(description=PPO_DOC)
    add_data_args(p, step=3)
    p.add_argument("--unsupervised_dataset_name", type=str, default=None,
                   help="Text for the PTX loss: a local .txt/.jsonl file or a hub dataset name. Off by default.")
    p.add_argument("--unsupervised_dataset_config_name", type=str, default=None,
                   help="The hub dataset's configuration (with a hub --unsupervised_dataset_name).")
    p.add_argument("--unsup_coef", type=float, default=27.8, help="Weight of the PTX loss.")
    p.add_argument("--actor_model_name_or_path", type=str, default="output/actor-models/builtin",
                   help="Step-1 output (the e2e default location).")
    p.add_argument("--critic_model_name_or_path", type=str, default=None,
                   help="Step-2 output: the reward model (--reward_fn reward_model) and the critic's start (gae). "
                        "Default output/reward-models/builtin (the e2e location) where one is used; refused where "
                        "none is (rule-based rewards with a critic-free estimator or --critic_from_actor).")
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for compatibility; end positions come from the attention mask.")
    p.add_argument("--per_device_generation_batch_size", type=int, default=16,
                   help="Prompts per rollout batch on each rank.")
    p.add_argument("--per_device_training_batch_size", type=int, default=16,
                   help="Rollouts per PPO micro-batch on each rank.")
    p.add_argument("--generation_batches", type=int, default=1, help="Rollout batches per PPO step.")
    p.add_argument("--ppo_epochs", type=int, default=1, help="Passes of PPO updates over each step's rollouts.")
    p.add_argument("--max_prompt_seq_len", type=int, default=256, help="Prompts are cut to this many tokens.")
    p.add_argument("--max_answer_seq_len", type=int, default=64,
                   help="Longest sampled answer (DeepSpeed-Chat: 256; the builtin task needs ~20).")
    p.add_argument("--num_train_epochs", type=int, default=1, help="Passes over the prompt split.")
    p.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULERS,
                   help="transformers' learning-rate schedule of actor and critic after the warmup.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    add_optim_args(p, warmup=10, warmup_help=" (DeepSpeed-Chat: 100, for runs of thousands of steps)")
    p.add_argument("--preprocessing_num_workers", type=int, default=None,
                   help="Accepted for DeepSpeed-Chat compatibility; no effect.")
    for role in ("actor", "critic"):
        p.add_argument(f"--{role}_weight_decay", type=float, default=None if role == "critic" else 0.0,
                       help="Critic: default 0.0, refused with a critic-free --advantage_estimator." if role == "critic"
                       else "The actor's AdamW weight decay.")
        p.add_argument(f"--{role}_zero_stage", type=int, default=0, choices=[0, 1, 2, 3],
                       help=f"DeepSpeed ZeRO stage of the {role} (3 shards its parameters).")
        p.add_argument(f"--{role}_gradient_checkpointing", action="store_true",
                       help=f"Recompute the {role}'s activations in the backward pass (less memory).")
        p.add_argument(f"--{role}_dropout", type=float, default=None,
                       help=f"Dropout of the {role} while it trains (default none: PPO's old and new log-probs "
                            f"{'and values ' if role == 'critic' else ''}must come from one function; the model "
                            f"config's own rates are replaced by 0).")
        add_lora_args(p, f"{role}_")
    add_ppo_args(p)
    add_run_args(p, tb_default="step3_tensorboard")
    add_padding_free_arg(p, "every step-3 forward but generation (actor and reference log-probs, critic values, "
                            "reward-model and gold scores)")
    add_export_args(p, "<output_dir>/actor")
    set_step3_help(p)
    return p


def parse_sft_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step 1's flags parsed and checked."""
    return parse_step_args(sft_parser(), argv, check_common_args)


def parse_rm_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step 2's flags parsed and checked."""
    return parse_step_args(rm_parser(), argv, check_common_args)


def parse_dpo_args(argv: list[str] | None = None) -> argparse.Namespace:
    """DPO's flags parsed and checked."""
    return parse_step_args(dpo_parser(), argv, check_dpo_args)


def parse_ppo_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step 3's flags parsed and checked."""
    return parse_step_args(ppo_parser(), argv, check_rlhf_args)


PARSERS = {"sft": sft_parser, "rm": rm_parser, "dpo": dpo_parser, "ppo": ppo_parser}


def _step_main(args: argparse.Namespace, phase: int, model_path: str, run_class: Any, start: str = "start") -> None:
    """What every step's body does with its parsed flags: --print_examples shows the data of `phase` and stops;
    otherwise --output_dir is required and held for the whole run of `run_class` (one run per folder; a killed
    save's files put back first)."""
    if args.print_examples:
        print_examples(args, phase, model_path)
        return
    require_output_dir(args)
    with claim_output_dir(args):
        run_step(run_class(args), start)


def sft_main(argv: list[str] | None = None) -> None:
    """Setup, train, evaluate, save (--print_examples: show the data, then stop)."""
    from dschat.trainers.sft import SFTRun

    args = parse_sft_args(argv)
    _step_main(args, 1, args.model_name_or_path, SFTRun)


def rm_main(argv: list[str] | None = None) -> None:
    """Setup, evaluate, train, save, summarise (--print_examples: show the data, then stop)."""
    from dschat.trainers.reward import RewardRun

    args = parse_rm_args(argv)
    _step_main(args, 2, args.model_name_or_path, RewardRun)


def dpo_main(argv: list[str] | None = None) -> None:
    """Setup, evaluate, train, save, summarise (--print_examples: show the data, then stop)."""
    from dschat.trainers.dpo import DPORun

    args = parse_dpo_args(argv)
    _step_main(args, 2, args.model_name_or_path, DPORun)


def ppo_main(argv: list[str] | None = None) -> None:
    """Setup, evaluate the SFT actor, PPO, evaluate, save (--print_examples: show the data, then stop)."""
    from dschat.trainers.ppo_run import RLHFRun

    args = parse_ppo_args(argv)
    _step_main(args, 3, args.actor_model_name_or_path, RLHFRun, "start (SFT)")
