"""SFT, PPO (gae), GRPO, RLOO, REINFORCE++ (with and without baseline) and DPO on the builtin task, from one
SFT model and one reward model, scored by the ground-truth judge on 64 held-out prompts; and GRPO trained
against the judge itself (--reward_fn builtin_judge, no reward model), which shows what the reward model's
proxy costs.

    python bench/compare_algorithms.py --seeds 1234 2 3            # all algorithms, 3 seeds
    python bench/compare_algorithms.py --algos gae grpo --seeds 1234   # a subset

Step 1 and step 2 run once with the e2e defaults (their training_scripts/run_tiny_cpu.sh) unless their
outputs exist under --workdir. Every RL run uses the same sample budget: 300 PPO steps of 16 sampled
answers, batch 16, step 3's defaults otherwise. PPO and REINFORCE++ sample 1 answer for each of 16 prompts;
the group estimators (grpo, rloo, reinforce_pp_baseline) sample 4 answers for each of 4 prompts, from a
quarter of step 3's prompt share (`--data_split 4.5,4.5,1`: with seed 1234 a subset of the 2,4,4 phase-3
prompts, so no prompt the SFT or reward model trained on; other seeds also re-draw the split, as
DeepSpeed-Chat's --seed does). The judge's 64 held-out prompts never appear in any training. DPO runs step 2's DPO script from the same SFT model (its own pairs
are the phase-2 share). Runs go one at a time (two trainings on 2 cores slow each other 5-10x). Peak RSS
is the run's maximum resident set size (GNU time). Prints a table and writes <workdir>/compare.json.
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
GROUP = ["--n_samples_per_prompt", "4", "--per_device_generation_batch_size", "4", "--data_split", "4.5,4.5,1"]
ALGOS = {
    "gae": [],
    "grpo": ["--advantage_estimator", "grpo", *GROUP],
    "rloo": ["--advantage_estimator", "rloo", *GROUP],
    "reinforce_pp": ["--advantage_estimator", "reinforce_pp"],
    "reinforce_pp_baseline": ["--advantage_estimator", "reinforce_pp_baseline", *GROUP],
    # the same GRPO with the e2e verifier recipe's smaller KL coefficient, against the reward model ...
    "grpo_kl02": ["--advantage_estimator", "grpo", *GROUP, "--kl_ctl", "0.02"],
    # ... and against the judge itself (run_tiny_cpu_verifier.sh's settings): what the reward model's proxy costs
    "grpo_judge": ["--advantage_estimator", "grpo", *GROUP, "--kl_ctl", "0.02", "--reward_fn", "builtin_judge"],
    "dpo": None,  # step 2's DPO, not a step-3 estimator
}
NAMES = {"gae": "PPO (gae)", "grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++",
         "reinforce_pp_baseline": "REINFORCE++ baseline", "grpo_kl02": "GRPO kl 0.02",
         "grpo_judge": "GRPO on the judge", "dpo": "DPO"}


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


def metrics(folder: Path) -> dict:
    """The dschat_metrics.json a step wrote."""
    return json.loads((folder / "dschat_metrics.json").read_text())


def main() -> None:
    """Train what is missing, run every algorithm and seed, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1234])
    p.add_argument("--workdir", type=Path, default=ROOT / "output" / "compare")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per run (the machine's cores).")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    work = args.workdir.resolve()
    sft, rm = work / "sft", work / "rm"
    if not (sft / "dschat_complete.json").exists():
        print("step 1 (SFT) ...", flush=True)
        timed(["bash", str(STEP1), str(sft), "0"], work / "logs/sft.log", env)
    if not (rm / "dschat_complete.json").exists():
        print("step 2 (reward model) ...", flush=True)
        timed(["bash", str(STEP2), str(rm), "0", str(sft)], work / "logs/rm.log", env)
    sft_judge = metrics(sft)["evals"][-1]["judge"]
    rows: dict[str, list[dict]] = {}
    for algo in args.algos:
        for seed in args.seeds:
            out = work / f"{algo}-seed{seed}"
            print(f"{NAMES[algo]} seed {seed} ...", flush=True)
            if algo == "dpo":
                if not DPO.exists():
                    print("  (no DPO step in this checkout; skipped)")
                    break
                wall, rss = timed(["bash", str(DPO), str(out), "0", str(sft), "--seed", str(seed)],
                                  work / f"logs/{algo}-{seed}.log", env)
                evals = metrics(out)["evals"]
                row = {"judge": evals[-1]["judge"], "kl": None}
            else:
                rules_only = "--reward_fn" in ALGOS[algo]  # no reward model: none is passed
                cmd = [sys.executable, str(STEP3), "--actor_model_name_or_path", str(sft),
                       *([] if rules_only else ["--critic_model_name_or_path", str(rm)]), "--enable_hybrid_engine",
                       "--output_dir", str(out), "--seed", str(seed), *ALGOS[algo]]
                wall, rss = timed(cmd, work / f"logs/{algo}-{seed}.log", env)
                m = metrics(out / "actor")
                row = {"judge": m["evals"][-1]["judge"], "kl": m["evals"][-1]["kl"], "steps": m["ppo_steps"],
                       "start_judge": m["evals"][0]["judge"], "chosen_judge": m.get("chosen_judge")}
            rows.setdefault(algo, []).append(row | {"seed": seed, "wall_s": wall, "peak_rss_mib": rss})
            print(f"  judge {row['judge']:.3f}, wall {wall:.0f} s, peak RSS {rss:.0f} MiB", flush=True)
    result = {"sft_judge": sft_judge, "runs": rows}
    (work / "compare.json").write_text(json.dumps(result, indent=1))

    def span(values: list[float], fmt: str) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        lo, hi, med = min(values), max(values), statistics.median(values)
        return format(med, fmt) if len(values) == 1 else f"{format(med, fmt)} ({format(lo, fmt)}-{format(hi, fmt)})"

    print(f"\nbuiltin task, 64 held-out prompts; median (min-max) over seeds {args.seeds}")
    print(f"{'algorithm':<22}{'judge':>22}{'vs SFT':>9}{'KL to SFT':>20}{'wall s':>16}{'peak RSS MiB':>18}")
    print(f"{'SFT (start)':<22}{sft_judge:>22.3f}{'':>9}{'0':>20}{'':>16}{'':>18}")
    for algo, runs in rows.items():
        judges = [r["judge"] for r in runs]
        print(f"{NAMES[algo]:<22}{span(judges, '.3f'):>22}{statistics.median(judges) - sft_judge:>+9.3f}"
              f"{span([r['kl'] for r in runs], '.2f'):>20}{span([r['wall_s'] for r in runs], '.0f'):>16}"
              f"{span([r['peak_rss_mib'] for r in runs], '.0f'):>18}")


if __name__ == "__main__":
    main()
