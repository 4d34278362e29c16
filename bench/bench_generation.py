"""Rollout generation throughput: plain ZeRO generate vs our hybrid twin, on the same actor engine.

    deepspeed --num_gpus 2 bench/bench_generation.py --zero_stage 3        # 2 CPU ranks here
    python bench/bench_generation.py --zero_stage 0
    python bench/bench_generation.py --model smollm2-135m --zero_stage 0 --dtype bf16 --batch 4,16,64

Builds the actor exactly as step 3 does (DeepSpeed engine at --zero_stage, weights in --dtype), samples
--batch prompts of the builtin task (a comma list: one line per batch size) for --new_tokens tokens (min =
max, so both paths generate the same number of tokens), and alternates the two paths --repeats times.
Prints tokens/s per rank (median) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dschat.data.builtin_task import heldout_prompts  # noqa: E402
from dschat.data.prompts import PromptFormat  # noqa: E402
from dschat.models.loading import create_hf_model, load_tokenizer  # noqa: E402
from dschat.runtime import dist  # noqa: E402
from dschat.runtime.ds_config import get_train_ds_config  # noqa: E402
from dschat.runtime.engine import build_engine, device, torch_dtype  # noqa: E402
from dschat.trainers.rollout import Generator, encode_prompts  # noqa: E402


def main() -> None:
    """Time both generation paths and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="builtin")
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--batch", default="8", help="prompts per generate call; a comma list runs each size")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batch {args.batch!r}: expected positive integers separated by commas")
    dist.init_distributed()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model, padding_side="left")
    cfg = get_train_ds_config(stage=args.zero_stage, dtype=args.dtype, micro_batch=max(batches),
                              world_size=dist.world_size())
    model = create_hf_model(AutoModelForCausalLM, args.model, tok, cfg, torch_dtype(args.dtype))
    engine = build_engine(model, cfg, 1e-5, 0.0, 1e-5, "constant", 0, 10)
    fmt = PromptFormat.create(tok)
    sampling = {"do_sample": True, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    gens = {"plain": Generator(engine, fmt, False, args.zero_stage), "hybrid": Generator(engine, fmt, True,
                                                                                        args.zero_stage)}
    for batch in batches:
        prompt, mask = encode_prompts(fmt, heldout_prompts(n=batch), device())
        rates: dict[str, list[float]] = {k: [] for k in gens}
        for rep in range(args.repeats + 1):
            for name, gen in gens.items():
                dist.barrier()
                start = time.time()
                out = gen.generate(prompt, mask, **sampling).seq
                elapsed = time.time() - start
                if rep > 0:  # the first round warms up (hybrid builds its twin there)
                    rates[name].append((out.shape[1] - prompt.shape[1]) * batch / elapsed)
        plain, hybrid = statistics.median(rates["plain"]), statistics.median(rates["hybrid"])
        dist.print_rank0(f"{args.model} {args.dtype}, ZeRO-{args.zero_stage}, {dist.world_size()} rank(s), "
                         f"batch {batch}, {args.new_tokens} new tokens: plain {plain:.0f} tok/s/rank, "
                         f"hybrid {hybrid:.0f} tok/s/rank, hybrid/plain {hybrid / plain:.2f}x")


if __name__ == "__main__":
    main()
