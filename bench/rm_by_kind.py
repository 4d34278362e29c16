"""Reward-model diagnostics on the builtin task: pairwise accuracy per kind of rejected answer, and the
mean score of correct catalogue-order lists by length (does the model reward lists longer than the
demonstrations?). With --actor, that step-1/3 model's greedy answers to held-out prompts, cut to their
distinct correct items and extended with the category's next catalogue items: does the reward model pay
this actor for a longer list (if not, PPO cannot learn one from it)?

    python bench/rm_by_kind.py --model output/reward-models/builtin [--pairs 600] [--actor ACTOR_DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "step2_reward_model_finetuning"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "step1_supervised_finetuning"))

from prompt_eval import answers  # noqa: E402
from rw_eval import load_reward_model, score  # noqa: E402

from dschat.cli.entry import run_main  # noqa: E402
from dschat.data import builtin_task as bt  # noqa: E402
from dschat.data.prompts import PromptFormat  # noqa: E402


def rejection_kind(prompt: str, chosen: str, rejected: str) -> str:
    """Which of builtin_task.REJECTION_KINDS turned `chosen` into `rejected` (read off the two answers)."""
    cat = bt.category_of(prompt)
    good, bad = bt.parse_items(chosen), bt.parse_items(rejected)
    if rejected.strip() == bt.format_items([]).strip():
        return "refuse"
    if len(bad) < len(good):
        return "drop"
    if len(set(bad)) < len(bad):
        return "extra_repeat" if len(bad) > len(good) else "repeat"
    extra = "extra_" if len(bad) > len(good) else ""
    new = [item for item in bad if item not in good]
    if new[0] in bt.OUTSIDE[cat]:
        return extra + "outside"
    if new[0] in {bt.plural(item) for item in good}:
        return "plural"
    # one wrong-category item among correct ones is "wrong"; a whole list from another category is not
    return "other_category" if len(new) > 1 else extra + "wrong"


def main() -> None:
    """Print accuracy per rejection kind and mean score by list length."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="A step-2 output folder.")
    p.add_argument("--pairs", type=int, default=600, help="Held-out builtin pairs scored.")
    p.add_argument("--max_len", type=int, default=8, help="Longest correct list scored.")
    p.add_argument("--prompt_format", choices=["auto", "dschat", "chat_template"], default="auto")
    p.add_argument("--actor", help="A causal-LM folder (step 1 or step 3) whose greedy answers are extended.")
    p.add_argument("--actor_prompts", type=int, default=24, help="Held-out prompts the --actor answers.")
    args = p.parse_args()
    model, tokenizer = load_reward_model(args.model)
    fmt = PromptFormat.create(tokenizer, args.prompt_format)  # as in training: the chat template when there is one
    hits = defaultdict(list)
    for row in bt.builtin_dataset()["eval"][: args.pairs]:
        kind = rejection_kind(row["prompt"], row["chosen"], row["rejected"])
        hits[kind].append(score(model, fmt, row["prompt"], row["chosen"])
                          > score(model, fmt, row["prompt"], row["rejected"]))
    for kind in bt.REJECTION_KINDS:
        if hits[kind]:
            print(f"{kind:15s} pairs {len(hits[kind]):4d}  accuracy {sum(hits[kind]) / len(hits[kind]):.3f}")
    total = [h for v in hits.values() for h in v]
    print(f"{'all':15s} pairs {len(total):4d}  accuracy {sum(total) / len(total):.3f}")
    rng, prompts = random.Random(0), bt.heldout_prompts(n=20)
    for k in range(1, args.max_len + 1):
        scores = [score(model, fmt, q, bt.format_items(bt.catalogue_sample(rng, bt.category_of(q), k)))
                  for q in prompts]
        print(f"correct list of {k} items: mean score {sum(scores) / len(scores):8.3f}")
    if args.actor:
        extended_scores(model, fmt, args)


def extended_scores(model, fmt: PromptFormat, args: argparse.Namespace) -> None:
    """Score the --actor's greedy answers cut to their correct items, then extended one catalogue item at a time."""
    prompts = bt.heldout_prompts(n=args.actor_prompts)
    greedy = answers(args.actor, prompts, {"max_new_tokens": 32, "do_sample": False}, 1234, args.prompt_format)
    by_len = defaultdict(list)
    for prompt, (answer,) in zip(prompts, greedy):
        words = bt.CATEGORIES[bt.category_of(prompt)]
        kept = list(dict.fromkeys(item for item in bt.parse_items(answer) if item in words))
        more = [item for item in words if item not in kept]
        for k in range(len(kept), args.max_len + 1):
            by_len[k].append(score(model, fmt, prompt, bt.format_items(kept + more[: k - len(kept)])))
    for k, scores in sorted(by_len.items()):
        print(f"actor's correct items extended to {k}: mean score {sum(scores) / len(scores):8.3f} "
              f"({len(scores)} answers)")


if __name__ == "__main__":
    run_main(main)
