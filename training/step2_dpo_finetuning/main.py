"""Step 2 alternative: DPO (direct preference optimisation) of a causal LM on chosen/rejected pairs.

The policy starts from --model_name_or_path (normally step 1's output) and a frozen copy of the same model
is the reference; no reward model and no step 3. The output folder is a plain causal LM that loads with
transformers alone (and chat.py --path).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.algos.losses import DPO_LOSS_KINDS  # noqa: E402
from dschat.cli.args import add_data_args, add_model_args, add_run_args, check_common_args  # noqa: E402
from dschat.cli.entry import parse_step_args, run_main, run_step  # noqa: E402
from dschat.cli.examples import print_examples  # noqa: E402
from dschat.runtime.errors import FlagError  # noqa: E402
from dschat.trainers.dpo import DPORun  # noqa: E402

LR_HELP = ("Learning rate. The default 5e-4 suits the builtin tiny model; DeepSpeed-Chat-scale (350M+) "
           "pretrained models use ~1e-6..5e-7 for DPO.")


def check_args(args: argparse.Namespace) -> None:
    """The shared flag checks plus DPO's own."""
    check_common_args(args)
    if not (math.isfinite(args.beta) and args.beta > 0):
        raise FlagError(f"--beta must be a finite number > 0 (got {args.beta})")
    for name, least in (("num_judge_prompts", 0), ("max_new_tokens", 1)):
        if getattr(args, name) < least:
            raise FlagError(f"--{name} must be at least {least} (got {getattr(args, name)})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """DPO flags: step 2's data/model/run flags (DeepSpeed-Chat names) plus --beta, --loss_type and judge eval."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, step=2)
    add_model_args(p, lr=5e-4, lr_help=LR_HELP)
    add_run_args(p, tb_default="step2_dpo_tensorboard")
    p.add_argument("--beta", type=float, default=0.1,
                   help="Strength of the pull towards the reference (implicit reward = beta * log-ratio).")
    p.add_argument("--loss_type", choices=list(DPO_LOSS_KINDS), default="sigmoid",
                   help="sigmoid: -logsigmoid(beta * h) (DPO); ipo: (h - 1/(2 beta))^2 (IPO); h = the chosen "
                        "minus the rejected answer's log-ratio to the reference (summed over answer tokens).")
    p.add_argument("--no_shared_base", action="store_true",
                   help="With --lora_dim and --only_optimize_lora the reference is the policy with its adapters "
                        "off (no second copy of the model); this flag builds a separate frozen copy instead.")
    p.add_argument("--print_loss", action="store_true", help="Print the loss of every step.")
    p.add_argument("--num_judge_prompts", type=int, default=64,
                   help="Held-out builtin prompts answered greedily and scored by the judge at each eval.")
    p.add_argument("--max_new_tokens", type=int, default=32, help="Answer length for judge evaluation.")
    return parse_step_args(p, argv, check_args)


def main(argv: list[str] | None = None) -> None:
    """Setup, evaluate, train, save, summarise (--print_examples: show the data, then stop)."""
    args = parse_args(argv)
    if args.print_examples:
        print_examples(args, 2, args.model_name_or_path)
        return
    run_step(DPORun(args))


if __name__ == "__main__":
    run_main(main)
