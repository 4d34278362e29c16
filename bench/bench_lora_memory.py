"""Step-3 peak memory: full fine-tuning, LoRA with frozen copies, shared frozen bases, gradient checkpointing.

    python bench/bench_lora_memory.py --actor output/smol/actor-models/smollm2-135m \
        --critic output/smol/reward-models/smollm2-135m

Runs training/step3_rlhf_finetuning/main.py unchanged, one run after the other, with the same flags on the
builtin task's prompts for a few PPO steps: "full" trains all weights of actor and critic (four models);
the others use LoRA (--actor_lora_dim/--critic_lora_dim, --only_optimize_lora). "copies" adds --no_shared_base
(separate reference and reward models, DeepSpeed-Chat's layout); "shared" is the default (reference = actor
with adapters off, reward = critic with adapters off); "shared-ckpt" adds gradient checkpointing to actor and
critic (activations recomputed in the backward instead of kept). --hybrid also runs each variant with
--enable_hybrid_engine (the hybrid twin is one more full copy of the actor).
Peak RSS is the child process's ru_maxrss (os.wait4); the seconds are its wall time, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_step3(flags: list[str], workdir: Path, name: str) -> dict:
    """One step-3 run as a child process: its exit status, wall seconds, peak RSS (MiB) and final KL line."""
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "training/step3_rlhf_finetuning/main.py"), *flags, "--output_dir", str(out)]
    log = open(workdir / f"{name}.log", "w")
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    log.close()
    text = (workdir / f"{name}.log").read_text()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        sys.exit(f"{name} failed (status {rc}):\n{text[-3000:]}")
    kl = [line for line in text.splitlines() if line.startswith("KL to reference")]
    return {"name": name, "seconds": round(time.time() - start, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "kl_line": kl[-1].strip() if kl else ""}


def main() -> None:
    """Run each variant once and print a Markdown table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actor", required=True, help="Step-1 actor (a causal-LM folder or name).")
    p.add_argument("--critic", required=True, help="Step-2 reward model folder.")
    p.add_argument("--lora_dim", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="PPO steps per run (--test_stop_step).")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--answer_len", type=int, default=24)
    p.add_argument("--workdir", default=None)
    p.add_argument("--hybrid", action="store_true", help="Also run every variant with --enable_hybrid_engine.")
    p.add_argument("--json", default=None, help="Also write the results here.")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_lora_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    common = ["--actor_model_name_or_path", args.actor, "--critic_model_name_or_path", args.critic,
              "--data_path", "dschat/builtin", "--data_split", "3,6,91", "--dtype", "fp32",
              "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size",
              str(args.batch), "--max_answer_seq_len", str(args.answer_len), "--num_judge_prompts", "8",
              "--enable_test_mode", "--test_stop_step", str(args.steps), "--data_output_path", str(workdir / "data")]
    lora = ["--actor_lora_dim", str(args.lora_dim), "--critic_lora_dim", str(args.lora_dim), "--only_optimize_lora",
            "--actor_lora_learning_rate", "5e-4", "--critic_lora_learning_rate", "5e-4"]
    ckpt = ["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"]
    variants = [("full", "full fine-tuning, four models", []),
                ("copies", "LoRA, separate frozen copies", [*lora, "--no_shared_base"]),
                ("shared", "LoRA, actor/critic with adapters off", lora),
                ("shared-ckpt", "LoRA, adapters off + gradient checkpointing", [*lora, *ckpt])]
    results = []
    for hybrid in (False, True) if args.hybrid else (False,):
        for name, label, extra in variants:
            name = f"{name}{'-hybrid' if hybrid else ''}"
            res = run_step3([*common, *extra, *(["--enable_hybrid_engine"] if hybrid else [])], workdir, name)
            res["label"] = label + (" (hybrid twin)" if hybrid else "")
            results.append(res)
            print(f"[{name}] {res}", flush=True)
    base = {r["name"].endswith("-hybrid"): r["peak_rss_mib"] for r in results if r["name"].startswith("copies")}
    print("\n| variant | peak RSS MiB | wall s | / LoRA with copies |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['peak_rss_mib']} | {r['seconds']} | "
              f"{r['peak_rss_mib'] / base[r['name'].endswith('-hybrid')]:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
