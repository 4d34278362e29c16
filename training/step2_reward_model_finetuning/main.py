"""Step 2: reward model fine-tuning on chosen/rejected pairs (DeepSpeed-Chat flags).

The reward model is AutoModelForSequenceClassification (num_labels=1) started from a causal LM (normally
step 1's output via --model_name_or_path); the output folder loads with transformers alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dschat.cli.args import add_data_args, add_model_args, add_run_args, check_common_args  # noqa: E402
from dschat.cli.entry import parse_step_args, run_main, run_step  # noqa: E402
from dschat.cli.examples import print_examples  # noqa: E402
from dschat.trainers.reward import RewardRun  # noqa: E402

LR_HELP = ("Learning rate. The default 1e-3 suits the builtin tiny model (5 epochs); DeepSpeed-Chat's 5e-5 "
           "is for 350M+ pretrained models: use ~5e-5..1e-5 (and 1 epoch) for those, as the scripts do.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Step-2 flags: DeepSpeed-Chat's, plus loss choice, evaluation, checkpoint and safety flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, step=2)
    add_model_args(p, lr=1e-3, lr_help=LR_HELP)
    add_run_args(p, tb_default="step2_tensorboard")
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
    return parse_step_args(p, argv, check_common_args)


def main(argv: list[str] | None = None) -> None:
    """Setup, evaluate, train, save, summarise (--print_examples: show the data, then stop)."""
    args = parse_args(argv)
    if args.print_examples:
        print_examples(args, 2, args.model_name_or_path)
        return
    run_step(RewardRun(args))


if __name__ == "__main__":
    run_main(main)
