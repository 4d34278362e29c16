"""Step-3 PPO throughput: our pipeline vs TRL's PPOTrainer, same models, prompts and PPO shape.

    # TRL (needs a venv with trl==1.12.0, the last release with a PPO trainer: trl.experimental.ppo)
    OMP_NUM_THREADS=2 /work/trl-venv/bin/python bench/bench_vs_trl.py trl --steps 60
    # ours (the dev venv): runs training/step3_rlhf_finetuning/main.py unchanged as a subprocess
    OMP_NUM_THREADS=2 /work/venv/bin/python bench/bench_vs_trl.py ours --steps 60

Both modes use the SFT actor (policy, and a frozen copy as reference), the reward model (frozen) and a
value model initialised from the reward model; the builtin task's phase-3 train prompts (the same rows
step 3 samples from: --data_split 2,4,4, seed 1234), left-padded; 16 prompts per PPO step, 1 PPO epoch,
one mini-batch of 16, answers of at most 64 tokens sampled at temperature 1.0 and cut at EOS, fp32.
--batch, --answer_len, --max_prompt_len, --prompt_ids (TRL: a JSON list of prompt token-id lists instead of the
builtin prompts) and --our_args (ours: more step-3 flags, e.g. --data_path) change that;
bench/bench_real_vs_trl.py --steps ppo drives this file on SmolLM2-135M in both venvs.

Seconds per step are measured the same way in both: the wall-clock time between the ends of
consecutive PPO steps (TRL: its `on_step_end` callback; ours: the wall time TensorBoard records with
each step's scalars, which step 3 writes once at the end of every PPO step). Step 1 is timed from the
start of training (TRL: `on_train_begin`; ours: the start-of-run evaluation's scalars). Steady state is
the median over steps after --warmup. Start-up, the initial/final evaluation and saving are excluded
(the total wall time is printed as well). Answer length = answer tokens up to and including the first
EOS (or up to a sampled pad token; both trainers end an answer there), averaged over the step's 16.

`trl --trl_no_gc` is a diagnostic variant (not TRL as shipped): TRL's train() calls gc.collect() twice
per PPO step to release accelerator memory; on this 0.95M-parameter model on CPU those calls take most
of a TRL step, so the variant shows how much of the gap is that fixed per-step cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def summarise(name: str, step_times: list[float], answer_lens: list[float], warmup: int, batch: int,
              extra: dict) -> dict:
    """Print and return per-step times, the steady-state median s/step and samples/s, answer lengths."""
    steady = step_times[warmup:]
    med = statistics.median(steady)
    res = {"trainer": name, "steps": len(step_times), "warmup": warmup, "threads": extra.pop("threads"),
           "median_s_per_step": med, "mean_s_per_step_steady": statistics.fmean(steady),
           "loop_s": sum(step_times), "samples_per_s": batch / med, "mean_answer_len": statistics.fmean(answer_lens),
           "mean_answer_len_steady": statistics.fmean(answer_lens[warmup:]), **extra,
           "step_times_s": [round(t, 4) for t in step_times], "answer_lens": [round(a, 2) for a in answer_lens]}
    print(f"[{name}] per-step seconds: {' '.join(f'{t:.3f}' for t in step_times)}")
    print(f"[{name}] per-step mean answer length: {' '.join(f'{a:.1f}' for a in answer_lens)}")
    for k, v in extra.items():
        print(f"[{name}] {k}: {v:.3f}" if isinstance(v, float) else f"[{name}] {k}: {v}")
    print(f"[{name}] RESULT steps {len(step_times)} (median over steps {warmup + 1}..{len(step_times)}): "
          f"{med:.4f} s/step, {batch / med:.1f} samples/s; mean answer length {res['mean_answer_len']:.2f} "
          f"tokens (steady {res['mean_answer_len_steady']:.2f}); torch threads {res['threads']}")
    return res


def phase3_prompts(seed: int) -> list[str]:
    """The builtin task's phase-3 train prompts, exactly the rows step 3 trains on with default flags."""
    from dschat.data.phases import phase_rows

    return [r["prompt"] for r in phase_rows(["dschat/builtin"], "2,4,4", 3, seed)["train"]]


def run_trl(args: argparse.Namespace) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.actor, padding_side="left")
    if args.prompt_ids:  # already tokenised by the caller (bench_real_vs_trl.py: our PromptFormat's ids)
        ids = json.loads(Path(args.prompt_ids).read_text())
    else:
        ids = [tok(p)["input_ids"] for p in phase3_prompts(args.seed)]  # = dschat's prompt_ids()
    ids = [i for i in ids if len(i) <= args.max_prompt_len]  # step 3's --max_prompt_seq_len filter
    train = Dataset.from_dict({"input_ids": ids})
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.actor, **f32)
    ref = AutoModelForCausalLM.from_pretrained(args.actor, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **f32)
    reward.requires_grad_(False)
    ref.requires_grad_(False)

    cfg = PPOConfig(
        output_dir=args.workdir, report_to="none", save_strategy="no", seed=args.seed, use_cpu=True,
        bf16=args.bf16, fp16=False, gradient_checkpointing=False,  # PPOConfig defaults: bf16 on, checkpointing on
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        local_rollout_forward_batch_size=args.batch, num_ppo_epochs=1, total_episodes=args.batch * args.steps,
        response_length=args.answer_len, stop_token="eos", temperature=1.0, kl_coef=0.1, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, learning_rate=args.lr,
        num_sample_generations=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)

    # Light instrumentation (two wrappers in TRL's module namespace, a few tensor ops per step): answer
    # lengths from the EOS-truncated responses TRL scores, and time spent in generation.
    lens: list[list[float]] = []
    gen_times: list[float] = []
    orig_get_reward, orig_batch_generation = ppo_mod.get_reward, ppo_mod.batch_generation

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is reward:  # called on the postprocessed (cut at EOS) responses
            resp = query_responses[:, context_length:]
            lens.append((ppo_mod.first_true_indices(resp == pad_token_id)).float().tolist())
        return orig_get_reward(model, query_responses, pad_token_id, context_length)

    def batch_generation(*a, **k):
        t = time.time()
        out = orig_batch_generation(*a, **k)
        gen_times.append(time.time() - t)
        return out

    ppo_mod.get_reward, ppo_mod.batch_generation = get_reward, batch_generation
    if args.trl_no_gc:  # diagnostic only: TRL's train() calls gc.collect() twice per PPO step
        ppo_mod.gc = types.SimpleNamespace(collect=lambda *a, **k: 0)

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.time())

        def on_step_end(self, *a, **k):
            marks.append(time.time())

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train,
                         data_collator=DataCollatorWithPadding(tok), callbacks=[Clock()])
    setup_s = time.time() - start
    trainer.train()
    total = time.time() - start
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    answer_lens = [statistics.fmean(x) for x in lens]
    assert len(step_times) == args.steps == len(answer_lens), (len(step_times), len(answer_lens))
    return summarise("trl-no-gc" if args.trl_no_gc else "trl", step_times, answer_lens, args.warmup, args.batch, {
        "threads": torch.get_num_threads(),
        "versions": f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}",
        "optimizer": type(trainer.optimizer).__name__,
        "policy/value/reward params": f"{sum(p.numel() for p in policy.parameters())}/"
                                      f"{sum(p.numel() for p in value.parameters())}/"
                                      f"{sum(p.numel() for p in reward.parameters())}",
        "median_gen_time_s_steady": statistics.median(gen_times[args.warmup:]),
        "setup_s": setup_s, "total_wall_s": total})


def run_ours(args: argparse.Namespace) -> dict:
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = f"{args.workdir}/tb"
    cmd = [sys.executable, str(ROOT / "training/step3_rlhf_finetuning/main.py"),
           "--actor_model_name_or_path", args.actor, "--critic_model_name_or_path", args.reward,
           "--enable_test_mode", "--test_stop_step", str(args.steps),
           "--per_device_generation_batch_size", str(args.batch), "--per_device_training_batch_size", str(args.batch),
           "--max_answer_seq_len", str(args.answer_len), "--max_prompt_seq_len", str(args.max_prompt_len),
           "--output_dir", f"{args.workdir}/out", "--data_output_path", args.data_output_path,
           "--seed", str(args.seed), "--enable_tensorboard", "--tensorboard_path", tb,
           *(["--enable_hybrid_engine"] if args.hybrid else []), *shlex.split(args.our_args)]
    print("[ours] command:", " ".join(cmd), flush=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.time() - start
    log = proc.stdout + proc.stderr
    Path(f"{args.workdir}/step3.log").write_text(log)
    if proc.returncode != 0:
        sys.exit(f"step 3 failed (rc {proc.returncode}):\n{log[-4000:]}")
    done = [line for line in log.splitlines() if line.startswith("step 3 done in")]
    ea = EventAccumulator(f"{tb}/step3_tensorboard", size_guidance={"scalars": 0})
    ea.Reload()
    steps = ea.Scalars("train/kl")
    start_eval = [e for e in ea.Scalars("eval/kl") if e.step == 0]
    marks = [start_eval[0].wall_time] + [e.wall_time for e in steps]
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    answer_lens = [e.value for e in ea.Scalars("train/answer_len")]
    assert len(step_times) == args.steps == len(answer_lens), (len(step_times), len(answer_lens))
    gen = [e.value for e in ea.Scalars("train/gen_time_s")][args.warmup:]
    exp = [e.value for e in ea.Scalars("train/experience_time_s")][args.warmup:]
    trn = [e.value for e in ea.Scalars("train/train_time_s")][args.warmup:]
    return summarise("ours", step_times, answer_lens, args.warmup, args.batch, {
        "threads": f"{torch.get_num_threads()} (this process; step 3 inherits OMP_NUM_THREADS="
                   f"{os.environ.get('OMP_NUM_THREADS')})",
        "median_gen_time_s_steady": statistics.median(gen),
        "median_experience_time_s_steady (gen + 4 forwards)": statistics.median(exp),
        "median_train_time_s_steady": statistics.median(trn),
        "step 3 printed": done[0] if done else "?", "total_wall_s": total})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainer", choices=["trl", "ours"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5, help="Steps left out of the steady-state median.")
    p.add_argument("--actor", default="/tmp/e2e1/actor-models/builtin")
    p.add_argument("--reward", default="/tmp/e2e1/reward-models/builtin")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=16, help="Prompts per PPO step (one mini-batch, 1 PPO epoch).")
    p.add_argument("--answer_len", type=int, default=64, help="Most answer tokens (cut at EOS).")
    p.add_argument("--max_prompt_len", type=int, default=256, help="Longer prompts are dropped (both sides).")
    p.add_argument("--prompt_ids", default=None, help="trl: JSON list of prompt token-id lists (default: the "
                                                       "builtin task's phase-3 prompts, tokenised here).")
    p.add_argument("--our_args", default="", help="ours: more step-3 flags, one string (e.g. \"--data_path DIR\").")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=True,
                   help="ours: --enable_hybrid_engine (default on).")
    p.add_argument("--lr", type=float, default=2e-4, help="TRL (one optimizer for policy and value); ours uses "
                                                          "its defaults, actor 2e-4 and critic 5e-4.")
    p.add_argument("--bf16", action="store_true", help="trl: bf16=True (TRL's mixed precision: fp32 weights, bf16 "
                                                       "autocast); ours takes --dtype through --our_args.")
    p.add_argument("--trl_no_gc", action="store_true",
                   help="Diagnostic, not TRL as shipped: make the two gc.collect() calls in each TRL PPO step "
                        "no-ops (they free GPU memory; on this tiny CPU model they dominate the step).")
    p.add_argument("--data_output_path", default="/tmp/bench_vs_trl_data", help="ours: step 3's data cache.")
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a new temporary one).")
    p.add_argument("--json", default=None, help="Also write the result here.")
    args = p.parse_args()
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("warning: OMP_NUM_THREADS is not set; set it to compare like with like", file=sys.stderr)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix=f"bench_vs_trl_{args.trainer}_")
    res = run_trl(args) if args.trainer == "trl" else run_ours(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
