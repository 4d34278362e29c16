"""--print_examples N: show the first N rows of a step's phase exactly as they will be tokenised, then stop."""

from __future__ import annotations

import argparse

from dschat.data.phases import LOSS_CLOSE, LOSS_OPEN, example_text, phase_rows
from dschat.data.prompts import PromptFormat
from dschat.models.loading import load_tokenizer

STEP_NAMES = {1: "step 1 (SFT)", 2: "step 2 (reward model / DPO)", 3: "step 3 (RLHF prompts)"}


def print_examples(args: argparse.Namespace, phase: int, model_path: str) -> None:
    """Print the first --print_examples rows of phase `phase` as the step would tokenise them (no training)."""
    tokenizer = load_tokenizer(model_path, getattr(args, "trust_remote_code", False))
    fmt = PromptFormat.create(tokenizer, args.prompt_format)
    sft_only = list(getattr(args, "sft_only_data_path", []) or []) if phase == 1 else []
    rows = phase_rows(list(args.data_path), args.data_split, phase, args.seed, sft_only)["train"]
    shown = rows[: args.print_examples]
    end = tokenizer.convert_ids_to_tokens(fmt.eos_token_id)
    print(f"{STEP_NAMES[phase]}: the first {len(shown)} of {len(rows)} training rows of {', '.join(args.data_path)}"
          f"{' + ' + ', '.join(sft_only) if sft_only else ''}, format {fmt.kind!r} (answers end with {end!r}); "
          f"the loss is on the tokens between {LOSS_OPEN} and {LOSS_CLOSE}")
    for i, row in enumerate(shown, 1):
        text = example_text(row, fmt, phase, getattr(args, "max_seq_len", 512), getattr(args, "max_prompt_seq_len", 256),
                            getattr(args, "train_on_prompt", False), getattr(args, "last_turn_only", False))
        print(f"----- example {i} {text}")
