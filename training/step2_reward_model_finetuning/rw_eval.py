"""Score prompt/response pairs with a trained reward model (step 2's output folder).

Unlike DeepSpeed-Chat's rw_eval.py, which builds a fresh, untrained value head on top of AutoModel, this
loads the saved model with AutoModelForSequenceClassification, head included, and refuses folders that
hold no reward model. Without --prompt/--response it scores chosen and rejected answers of held-out
builtin examples, with the builtin judge's score beside each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dschat.cli.entry import run_main  # noqa: E402
from dschat.data.prompts import PromptFormat  # noqa: E402
from dschat.models.loading import load_model, load_tokenizer, model_config  # noqa: E402
from dschat.runtime.errors import FlagError, ModelPathError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """rw_eval flags: DeepSpeed-Chat's three, plus explicit prompt/response pairs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", type=str, required=True, help="A step-2 output folder.")
    p.add_argument("--num_padding_at_beginning", type=int, default=1,
                   help="Accepted for compatibility and ignored (scores are taken at the last real token).")
    p.add_argument("--add_eot_token", action="store_true",
                   help="Accepted for compatibility: every response already ends with the tokenizer's EOS, "
                        "as in training.")
    p.add_argument("--prompt", action="append", default=[], help="A prompt; repeat together with --response.")
    p.add_argument("--response", action="append", default=[], help="The response scored for the matching --prompt.")
    p.add_argument("--num_examples", type=int, default=3, help="Builtin examples scored when no --prompt is given.")
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--prompt_format", choices=["auto", "dschat", "chat_template"], default="auto",
                   help="As in training: auto = the chat template when the tokenizer has one.")
    args = p.parse_args(argv)
    if len(args.prompt) != len(args.response):
        p.error(f"give one --response per --prompt (got {len(args.prompt)} prompts, {len(args.response)} responses)")
    for name in ("max_seq_len", "num_examples"):
        if getattr(args, name) < 1:
            raise FlagError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    return args


def load_reward_model(path: str):
    """(model, tokenizer) of a saved reward model; a clear error for folders that hold another kind of model."""
    from transformers import AutoModelForSequenceClassification

    config = model_config(path)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or getattr(config, "num_labels", 0) != 1:
        raise ModelPathError(f"{path} holds no reward model (architectures {archs}, num_labels "
                             f"{getattr(config, 'num_labels', None)}); train one with step 2 and pass its --output_dir")
    # load_model refuses corrupt files and a head that would be initialised at random (no trained head).
    model = load_model(AutoModelForSequenceClassification, path, allow_fresh_head=False).eval()
    return model, load_tokenizer(path)


@torch.no_grad()
def score(model, fmt: PromptFormat, prompt: str, response: str, max_seq_len: int = 512) -> float:
    """Reward of one response to one prompt, tokenised as in training (prompt + response + end of turn)."""
    ids = (fmt.prompt_ids(prompt) + fmt.answer_ids(response))[:max_seq_len]
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, 0].item()


def main(argv: list[str] | None = None) -> None:
    """Print the score of every pair (builtin examples: chosen and rejected answers with judge scores)."""
    args = parse_args(argv)
    model, tokenizer = load_reward_model(args.model_name_or_path)
    fmt = PromptFormat.create(tokenizer, args.prompt_format)
    if args.prompt:
        for prompt, response in zip(args.prompt, args.response):
            print(f"==================Eval result============================\nprompt: {prompt}\n"
                  f"response: {response}\nscore: {score(model, fmt, prompt, response, args.max_seq_len):.4f}")
        return
    from dschat.data.builtin_task import builtin_dataset, judge

    for row in builtin_dataset()["eval"][: args.num_examples]:
        print(f"==================Eval result============================\nprompt: {row['prompt']}")
        for label, key in (("good_ans", "chosen"), ("bad_ans", "rejected")):
            value = score(model, fmt, row["prompt"], row[key], args.max_seq_len)
            print(f"{label}: {row[key]!r}\n{label} score: {value:.4f} (judge {judge(row['prompt'], row[key]):.3f})")


if __name__ == "__main__":
    run_main(main)
