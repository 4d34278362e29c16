"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen answer (DeepSpeed-Chat flags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.cli.args import add_data_args, add_model_args, add_run_args, check_common_args  # noqa: E402
from dschat.cli.entry import parse_step_args, run_main, run_step  # noqa: E402
from dschat.cli.examples import print_examples  # noqa: E402
from dschat.trainers.sft import SFTRun  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step-1 flags: DeepSpeed-Chat's, plus evaluation, checkpoint and safety flags."""
    p = argparse.ArgumentParser(description=__doc__)
    add_data_args(p, step=1)
    add_model_args(p, lr=1e-3)
    add_run_args(p, tb_default="step1_tensorboard")
    p.add_argument("--eot_token", type=str, default="<|endoftext|>",
                   help="Accepted for compatibility; the tokenizer's own EOS ends every answer.")
    p.add_argument("--print_loss", action="store_true", help="Print the loss of every step.")
    p.add_argument("--train_on_prompt", action="store_true",
                   help="Loss on prompt and answer tokens, as DeepSpeed-Chat does (default: answer only).")
    p.add_argument("--last_turn_only", action="store_true",
                   help="On 'messages' conversations: loss on the last assistant turn only (default: on every "
                        "assistant turn; user and system turns never carry loss).")
    p.add_argument("--num_judge_prompts", type=int, default=64,
                   help="Held-out builtin prompts answered greedily and scored by the judge at each eval.")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Answer length for judge evaluation.")
    return parse_step_args(p, argv, check_common_args)


def main(argv: list[str] | None = None) -> None:
    """Setup, train, evaluate, save (--print_examples: show the data, then stop)."""
    args = parse_args(argv)
    if args.print_examples:
        print_examples(args, 1, args.model_name_or_path)
        return
    run_step(SFTRun(args))


if __name__ == "__main__":
    run_main(main)
