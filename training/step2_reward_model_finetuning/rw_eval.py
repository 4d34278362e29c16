"""Score prompt/response pairs with a trained reward model (step 2's output folder).

Unlike DeepSpeed-Chat's rw_eval.py, which builds a fresh, untrained value head on top of AutoModel, this
loads the saved model with AutoModelForSequenceClassification, head included, and refuses folders that
hold no reward model. Without --prompt/--response it scores chosen and rejected answers of held-out
builtin examples, with the builtin judge's score beside each. With --data_path (any preference data the
pipeline reads: a registered name, a local file, text or conversational) it reports pairwise accuracy on that
data's held-out split (the rows no step trains on; --split all: every pair, for a file no step trained on) next to the "longer answer wins" baseline on the same pairs;
--untrained_head scores with a fresh, seeded head on a causal LM instead (the untrained baseline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

try:
    import torch  # noqa: E402

    from dschat.cli.entry import run_main  # noqa: E402
    from dschat.data.prompts import PromptFormat  # noqa: E402
    from dschat.models.loading import load_model, load_tokenizer, model_config  # noqa: E402
    from dschat.runtime.errors import FlagError, ModelPathError  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while the libraries load: one line and 130, as at any later moment
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


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
    p.add_argument("--data_path", type=str, default=None,
                   help="Preference data (as step 2's --data_path): report pairwise accuracy on its --split.")
    p.add_argument("--split", choices=["eval", "train", "all"], default="eval",
                   help="With --data_path: the held-out rows (default; no step trains on them), the train rows, or "
                        "all: every pair of the data (a file no step trained on).")
    p.add_argument("--max_pairs", type=int, default=None, help="With --data_path: score only the first N pairs.")
    p.add_argument("--batch_size", type=int, default=8, help="With --data_path: pairs per forward.")
    p.add_argument("--seed", type=int, default=1234,
                   help="With --data_path: the seed that carves a file's held-out split (training's --seed).")
    p.add_argument("--untrained_head", action="store_true",
                   help="With --data_path: --model_name_or_path is a causal LM; score with a fresh head seeded "
                        "by --seed (the untrained-head baseline).")
    args = p.parse_args(argv)
    if len(args.prompt) != len(args.response):
        p.error(f"give one --response per --prompt (got {len(args.prompt)} prompts, {len(args.response)} responses)")
    for name in ("max_seq_len", "num_examples", "batch_size", "max_pairs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise FlagError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.data_path is None:
        given = [f for f in ("max_pairs", "untrained_head") if getattr(args, f)]
        if given or args.split != "eval":
            raise FlagError(f"--{(given or ['split'])[0]} needs --data_path")
    elif args.prompt:
        raise FlagError("give either --data_path or --prompt/--response, not both")
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


def load_untrained_head(path: str, seed: int):
    """(model, tokenizer): the causal LM at `path` with a fresh one-label head seeded by `seed` (a baseline)."""
    from dschat.models.heads import create_reward_model

    archs = getattr(model_config(path), "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise ModelPathError(f"--untrained_head: {path} already holds a reward model's head; pass the causal LM "
                             f"it was trained from (step 2's --model_name_or_path)")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(seed)
    return create_reward_model(path, tokenizer, {}, torch.float32).eval(), tokenizer


@torch.no_grad()
def pair_accuracy(model, fmt: PromptFormat, rows: list[dict], max_seq_len: int, batch_size: int) -> dict:
    """Pairwise accuracy of `model` on preference rows (as step 2 tokenises them) and the longer-answer baseline."""
    from tqdm import tqdm

    from dschat.algos.masked import end_scores
    from dschat.data.collators import RewardCollator
    from dschat.data.phases import tokenize_row
    from dschat.models.heads import token_values
    from dschat.trainers.reward import longer_answer_wins

    encoded = [e for e in (tokenize_row(r, fmt, 2, max_seq_len, max_seq_len, False) for r in rows) if e is not None]
    collate = RewardCollator(fmt.pad_token_id)
    correct = longer = 0.0
    with tqdm(total=len(encoded), desc="rw_eval pairs", unit="pair", dynamic_ncols=True) as bar:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start:start + batch_size])
            values = token_values(model, batch["input_ids"], batch["attention_mask"])
            chosen, rejected = end_scores(values, batch["attention_mask"]).float().chunk(2)
            correct += (chosen > rejected).sum().item()
            longer += longer_answer_wins(batch["attention_mask"]).item()
            bar.update(len(chosen))
            bar.set_postfix(accuracy=f"{correct / bar.n:.3f}")
    n = max(len(encoded), 1)
    return {"pairs": len(encoded), "skipped": len(rows) - len(encoded), "accuracy": correct / n,
            "longer_answer_accuracy": longer / n}


@torch.no_grad()
def score(model, fmt: PromptFormat, prompt: str, response: str, max_seq_len: int = 512) -> float:
    """Reward of one response to one prompt, tokenised as in training (prompt + response + end of turn)."""
    ids = (fmt.prompt_ids(prompt) + fmt.answer_ids(response))[:max_seq_len]
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, 0].item()


def main(argv: list[str] | None = None) -> None:
    """Print the score of every pair (builtin examples: chosen and rejected answers with judge scores)."""
    args = parse_args(argv)
    from dschat.models.builtin import resolve_model_name

    path = resolve_model_name(args.model_name_or_path)
    if args.untrained_head:
        model, tokenizer = load_untrained_head(path, args.seed)
    else:
        model, tokenizer = load_reward_model(path)
    fmt = PromptFormat.create(tokenizer, args.prompt_format)
    if args.data_path:
        from dschat.data.sources import load_raw

        raw = load_raw(args.data_path, args.seed)
        split_rows = raw["train"] + raw["eval"] if args.split == "all" else raw[args.split]
        rows = [r for r in split_rows if r.get("rejected") is not None]
        rows = rows[: args.max_pairs] if args.max_pairs else rows
        if not rows:
            raise FlagError(f"--data_path {args.data_path}: its '{args.split}' split holds no chosen/rejected pairs")
        r = pair_accuracy(model, fmt, rows, args.max_seq_len, args.batch_size)
        head = "untrained head" if args.untrained_head else "reward model"
        print(f"{head} {args.model_name_or_path}: pairwise accuracy {r['accuracy']:.4f} on {r['pairs']} pairs of "
              f"{args.data_path} ('{args.split}' split); the longer answer wins {r['longer_answer_accuracy']:.4f} "
              f"on the same pairs ({r['skipped']} pairs skipped: prompt longer than --max_seq_len)")
        return
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
