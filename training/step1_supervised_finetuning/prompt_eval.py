"""Compare a baseline and a fine-tuned causal LM on the same prompts (DeepSpeed-Chat's prompt_eval.py).

Both models answer each prompt with the same decoding settings (greedy by default) and the answers are
printed side by side. Without --prompt the prompts are held-out builtin ones, and each answer also gets
the builtin judge's score, with the mean per model at the end and what the answers list on average (items;
distinct correct ones; ones from another category; ones outside every catalogue; repeats). The baseline defaults to the builtin
base model, so `python prompt_eval.py --model_name_or_path_finetune <step-1 output>` just works.
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
    from dschat.models.builtin import resolve_model_name  # noqa: E402
    from dschat.models.loading import load_model, load_tokenizer  # noqa: E402
except KeyboardInterrupt:  # Ctrl-C while the libraries load: one line and 130, as at any later moment
    print("error: interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
    sys.exit(130)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """prompt_eval flags: DeepSpeed-Chat's, plus explicit prompts and a count of builtin prompts."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path_baseline", type=str, default="builtin",
                   help="The model before fine-tuning (default: the builtin base model).")
    p.add_argument("--model_name_or_path_finetune", type=str, required=True, help="The fine-tuned model.")
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--num_beam_groups", type=int, default=1, help="Accepted for compatibility (diverse beam search "
                   "left transformers' core in v5); must be 1.")
    p.add_argument("--top_k", type=int, default=4, help="Used with --penalty_alpha (contrastive search).")
    p.add_argument("--penalty_alpha", type=float, default=0.6,
                   help="Used only with --decoding contrastive (DeepSpeed-Chat keeps that mode commented out).")
    p.add_argument("--decoding", choices=["greedy", "beam", "sample", "contrastive"], default="greedy",
                   help="greedy (default, DeepSpeed-Chat's), beam (--num_beams), sample (--top_k/--temperature), "
                        "contrastive (--top_k/--penalty_alpha).")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--language", choices=["English", "Chinese", "Japanese"], default="English",
                   help="Accepted for compatibility; the prompts are the builtin ones or --prompt.")
    p.add_argument("--add_eot_token", action="store_true", help="Accepted for compatibility (EOS ends answers).")
    p.add_argument("--prompt", action="append", default=[],
                   help="A prompt in \"Human: ... Assistant:\" form, or a JSON list of {\"role\", \"content\"} messages "
                        "(rendered by the model's chat template, as in training); repeatable.")
    p.add_argument("--num_prompts", type=int, default=6, help="Held-out builtin prompts used when no --prompt is given.")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--prompt_format", choices=["auto", "dschat", "chat_template"], default="auto",
                   help="As in training: auto = each model's chat template when its tokenizer has one.")
    args = p.parse_args(argv)
    if args.num_beam_groups != 1:
        p.error("--num_beam_groups other than 1 (diverse beam search) is not supported by transformers 5")
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.num_return_sequences < 1:
        p.error("--num_prompts, --max_new_tokens and --num_return_sequences must be at least 1")
    return args


def parse_prompt(text: str) -> str | list[dict]:
    """A --prompt: DeepSpeed-Chat text, or (starting with "[") a JSON list of messages, checked as data rows are."""
    if not text.lstrip().startswith("["):
        return text
    import json

    from dschat.data.sources import messages_of
    from dschat.runtime.errors import FlagError

    try:
        return messages_of(json.loads(text), "prompt", "--prompt")
    except json.JSONDecodeError as err:
        raise FlagError(f"--prompt {text[:40]!r}...: starts with '[' but is not a JSON list of messages: {err}") from err


def decoding_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """generate() keyword arguments for the chosen --decoding mode."""
    kw: dict[str, object] = {"max_new_tokens": args.max_new_tokens, "num_return_sequences": args.num_return_sequences}
    if args.decoding == "beam":
        return {**kw, "num_beams": max(args.num_beams, args.num_return_sequences), "do_sample": False}
    if args.decoding == "sample":
        return {**kw, "do_sample": True, "top_k": args.top_k, "temperature": args.temperature}
    if args.decoding == "contrastive":
        return {**kw, "penalty_alpha": args.penalty_alpha, "top_k": args.top_k, "do_sample": False}
    if args.num_return_sequences > 1:
        raise SystemExit("error: greedy decoding returns one answer; use --decoding beam or sample with "
                         "--num_return_sequences > 1")
    return {**kw, "do_sample": False}


@torch.no_grad()
def answers(path: str, prompts: list[str], kwargs: dict[str, object], seed: int,
            prompt_format: str = "auto") -> list[list[str]]:
    """For each prompt, the answers of the model at `path` (one per returned sequence)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(path)
    model = load_model(AutoModelForCausalLM, path, tokenizer).eval()
    fmt = PromptFormat.create(tokenizer, prompt_format)
    out = []
    for prompt in prompts:
        torch.manual_seed(seed)
        ids = torch.tensor([fmt.prompt_ids(prompt)])
        seqs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=fmt.pad_token_id,
                              eos_token_id=fmt.eos_token_id, **kwargs)
        out.append(tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> None:
    """Print both models' answers per prompt (and judge scores on builtin prompts)."""
    args = parse_args(argv)
    from dschat.data.builtin_task import ITEM_KINDS, heldout_prompts, item_counts, judge

    builtin = not args.prompt
    prompts = heldout_prompts(n=args.num_prompts) if builtin else [parse_prompt(p) for p in args.prompt]
    kwargs = decoding_kwargs(args)
    paths = {"baseline": resolve_model_name(args.model_name_or_path_baseline),
             "finetune": resolve_model_name(args.model_name_or_path_finetune)}
    results = {name: answers(path, prompts, kwargs, args.seed, args.prompt_format) for name, path in paths.items()}
    totals: dict[str, list[float]] = {name: [] for name in paths}
    items = {name: dict.fromkeys(ITEM_KINDS, 0) for name in paths}
    for i, prompt in enumerate(prompts):
        print(f"==========prompt {i + 1}=========\n{prompt}")
        for name in paths:
            for answer in results[name][i]:
                score = ""
                if builtin:
                    totals[name].append(judge(prompt, answer))
                    score = f"   (judge {totals[name][-1]:.3f})"
                    for kind, n in item_counts(prompt, answer).items():
                        items[name][kind] += n
                print(f"=========={name}: {answer.strip()!r}{score}")
    if builtin:
        means = {name: sum(v) / len(v) for name, v in totals.items()}
        print(f"mean judge over {len(prompts)} held-out prompts: baseline {means['baseline']:.3f}, "
              f"finetune {means['finetune']:.3f}")
        for name in paths:
            per = ", ".join(f"{kind.replace('_', '-')} {n / len(totals[name]):.2f}" for kind, n in items[name].items())
            print(f"per answer, {name}: {per}")


if __name__ == "__main__":
    run_main(main)
