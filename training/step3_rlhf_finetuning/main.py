"""Step 3: PPO RLHF with actor, reference, critic and reward engines (DeepSpeed-Chat flags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.cli.args import SCHEDULERS, add_data_args, add_lora_args, add_run_args  # noqa: E402
from dschat.cli.entry import parse_step_args, run_main, run_step  # noqa: E402
from dschat.cli.examples import print_examples  # noqa: E402
from dschat.cli.rlhf_args import add_ppo_args, check_rlhf_args, set_step3_help  # noqa: E402
from dschat.trainers.ppo_run import RLHFRun  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every DeepSpeed-Chat step-3 flag, plus its hard-coded PPO constants and our additions."""
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, step=3)
    p.add_argument("--unsupervised_dataset_name", type=str, default=None,
                   help="Text for the PTX loss: a local .txt/.jsonl file or a hub dataset name.")
    p.add_argument("--unsupervised_dataset_config_name", type=str, default=None)
    p.add_argument("--unsup_coef", type=float, default=27.8)
    p.add_argument("--actor_model_name_or_path", type=str, default="output/actor-models/builtin",
                   help="Step-1 output (the e2e default location).")
    p.add_argument("--critic_model_name_or_path", type=str, default=None,
                   help="Step-2 output: the reward model (--reward_fn reward_model) and the critic's start (gae). "
                        "Default output/reward-models/builtin (the e2e location) where one is used; refused where "
                        "none is (rule-based rewards with a critic-free estimator or --critic_from_actor).")
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for compatibility; end positions come from the attention mask.")
    p.add_argument("--per_device_generation_batch_size", type=int, default=16)
    p.add_argument("--per_device_training_batch_size", type=int, default=16)
    p.add_argument("--generation_batches", type=int, default=1)
    p.add_argument("--ppo_epochs", type=int, default=1)
    p.add_argument("--max_prompt_seq_len", type=int, default=256)
    p.add_argument("--max_answer_seq_len", type=int, default=64,
                   help="Longest sampled answer (DeepSpeed-Chat: 256; the builtin task needs ~20).")
    p.add_argument("--num_train_epochs", type=int, default=1)
    p.add_argument("--lr_scheduler_type", type=str, default="cosine", choices=SCHEDULERS)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--num_warmup_steps", type=int, default=10,
                   help="DeepSpeed-Chat: 100 (for runs of thousands of steps).")
    p.add_argument("--preprocessing_num_workers", type=int, default=None, help="Accepted for compatibility.")
    for role in ("actor", "critic"):
        p.add_argument(f"--{role}_weight_decay", type=float, default=None if role == "critic" else 0.0,
                       help="Critic: default 0.0, refused with a critic-free --advantage_estimator." if role == "critic"
                       else None)
        p.add_argument(f"--{role}_zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
        p.add_argument(f"--{role}_gradient_checkpointing", action="store_true")
        p.add_argument(f"--{role}_dropout", type=float, default=None,
                       help=f"Dropout of the {role} while it trains (default none: PPO's old and new log-probs "
                            f"{'and values ' if role == 'critic' else ''}must come from one function; the model "
                            f"config's own rates are replaced by 0).")
        add_lora_args(p, f"{role}_")
    add_ppo_args(p)
    add_run_args(p, tb_default="step3_tensorboard")
    set_step3_help(p)
    return parse_step_args(p, argv, check_rlhf_args)


def main(argv: list[str] | None = None) -> None:
    """Setup, evaluate the SFT actor, PPO, evaluate, save (--print_examples: show the data, then stop)."""
    args = parse_args(argv)
    if args.print_examples:
        print_examples(args, 3, args.actor_model_name_or_path)
        return
    run_step(RLHFRun(args), "start (SFT)")


if __name__ == "__main__":
    run_main(main)
