#!/bin/bash
# Issue 27's checks where the CPU tests cannot see: bf16 on a GPU. One command, sized for at most 8 minutes
# on one GPU; installs nothing and needs no network (models: the builtin one and the packaged SmolLM2-135M).
#   bash bench/gpu_check.sh [WORKDIR]      (WORKDIR: outputs and one log per check; default: a new temp folder)
# Prints one line per check (PASS/FAIL, the check, its figure):
#   e2e      the builtin e2e (steps 1, 2, 3) in bf16: step 3's judge score, start -> end
#   smollm2  a SmolLM2-135M step-3 run (GRPO on the builtin judge) with LoRA and hybrid generation in bf16:
#            judge start -> end, the first PPO epoch's importance ratio (1 when the twin samples what the
#            engine computes)
#   twin     twin-versus-engine logits in bf16 under ZeRO-3 with LoRA (the twin refreshed layer by layer),
#            and the bf16 LoRA test of tests/test_gpu_correctness.py
#   resume   step 3 in bf16 with --enable_ema and the actor at ZeRO-3: stopped after step 1, resumed to step 2
# GPU_CHECKS="twin resume" runs only those checks (default: all four, in this order).
# Exit status: 0 when every check passed, 1 when one failed, 2 when there is no CUDA device (nothing run).
# Python: $PYTHON, else the repository's .venv, else python on PATH.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 2
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY=python
fi
PY="$(command -v "$PY")" || { echo "gpu_check: no python ($PY)"; exit 2; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: refused: no CUDA device (torch.cuda.is_available() is false); nothing was run"
    exit 2
fi
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/dschat_gpu_check.XXXXXX")}
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)" || exit 2
# The step scripts call `python`: this interpreter's. Offline, quiet, one GPU.
PATH="$(dirname "$PY"):$PATH"
export PATH
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
JUDGE_MIN=${JUDGE_MIN:-0.5}  # the builtin e2e's step-3 judge must end at least here (CPU fp32: 0.80)
STEP3="$REPO/training/step3_rlhf_finetuning/main.py"
export PY WORK STEP3
CHECKS=" ${GPU_CHECKS:-e2e smollm2 twin resume} "
FAILED=0
cd "$REPO" || exit 2
echo "gpu_check: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0), '| torch', torch.__version__)")" \
     "| logs in $WORK"

# report NAME RC SECONDS FIGURE_COMMAND...: one line; the figure command prints the figure and exits 0 for PASS.
report() {
    local name=$1 rc=$2 secs=$3 figure status
    shift 3
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        figure="timed out (see $WORK/$name.log)"
        status=1
    elif [ "$rc" -ne 0 ]; then
        figure="exit status $rc: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-160)"
        status=1
    else
        figure=$("$@" 2>&1)
        status=$?
        figure=$(printf '%s\n' "$figure" | tail -n 1)
    fi
    if [ "$status" -eq 0 ]; then
        printf 'PASS  %-8s %4ss  %s\n' "$name" "$secs" "$figure"
    else
        printf 'FAIL  %-8s %4ss  %s\n' "$name" "$secs" "$figure"
        FAILED=1
    fi
}

# run NAME LIMIT_S CMD...: CMD (a program, or one of this script's exported functions) with a time limit, its
# output in $WORK/NAME.log; sets RC and SECS.
run() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if [ "$(type -t "$1")" = function ]; then
        set -- bash -c '"$@"' _ "$@"
    fi
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    RC=$?
    SECS=$((SECONDS - start))
}

# 1. The builtin e2e in bf16 (every step's --dtype).
e2e_figure() {
    "$PY" - "$WORK/e2e" "$JUDGE_MIN" <<'EOF'
import json, sys
from pathlib import Path
out, floor = Path(sys.argv[1]), float(sys.argv[2])
summary = json.loads((out / "summary.json").read_text())
evals = json.loads((out / "step3-models/builtin/actor/dschat_metrics.json").read_text())["evals"]
start, end = evals[0]["judge"], evals[-1]["judge"]
ok = summary["status"] == "ok" and end >= floor
print(f"judge {start:.3f} -> {end:.3f} (needs >= {floor}), {summary['total_wall_time_s']:.0f}s in all")
sys.exit(0 if ok else 1)
EOF
}
if [[ $CHECKS == *" e2e "* ]]; then
    DSCHAT_E2E_EXTRA_ARGS_STEP1="--dtype bf16" DSCHAT_E2E_EXTRA_ARGS_STEP2="--dtype bf16" \
    DSCHAT_E2E_EXTRA_ARGS_STEP3="--dtype bf16" run e2e 210 "$PY" e2e_rlhf.py --output-dir "$WORK/e2e" --force
    report e2e "$RC" "$SECS" e2e_figure
fi

# 2. SmolLM2-135M step 3: LoRA, hybrid generation, sampling log-probs from the twin, bf16.
SMOL_STEPS=6
smol_figure() {
    "$PY" - "$WORK/smollm2" "$SMOL_STEPS" <<'EOF'
import json, math, sys
from pathlib import Path
out, steps = Path(sys.argv[1]), int(sys.argv[2])
m = json.loads((out / "actor/dschat_metrics.json").read_text())
ratios = {}
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for path in (out / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in ("train/ratio_mean", "train/ratio_max"):
            if tag in acc.Tags()["scalars"]:
                ratios.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
except ImportError:
    pass
judge = [e["judge"] for e in m["evals"]]
ratio = (f"ratio mean {ratios['train/ratio_mean'][0]:.4f} max {max(ratios['train/ratio_max']):.4f}"
         if ratios.get("train/ratio_mean") and ratios.get("train/ratio_max") else "ratio not logged")
ok = (out / "actor/dschat_complete.json").is_file() and m["ppo_steps"] == steps and all(map(math.isfinite, judge))
print(f"{m['ppo_steps']} PPO steps, judge {judge[0]:.3f} -> {judge[-1]:.3f}, {ratio}")
sys.exit(0 if ok else 1)
EOF
}
if [[ $CHECKS == *" smollm2 "* ]]; then
    run smollm2 120 "$PY" "$STEP3" --actor_model_name_or_path smollm2-135m --data_path dschat/builtin \
        --data_output_path "$WORK/smollm2_data" --reward_fn builtin_judge --prompt_format auto \
        --advantage_estimator grpo --n_samples_per_prompt 4 --temperature 0.7 --logprobs_from_generation \
        --actor_lora_dim 16 --only_optimize_lora --enable_hybrid_engine --dtype bf16 \
        --per_device_generation_batch_size 8 --per_device_training_batch_size 32 --max_prompt_seq_len 128 \
        --max_answer_seq_len 24 --actor_learning_rate 2e-5 --num_warmup_steps 0 --num_judge_prompts 32 \
        --enable_test_mode --test_stop_step "$SMOL_STEPS" --enable_tensorboard --tensorboard_path "$WORK/smollm2/tb" \
        --output_dir "$WORK/smollm2"
    report smollm2 "$RC" "$SECS" smol_figure
fi

# 3. Twin versus engine in bf16: ZeRO-3 with LoRA adapters that count (B of size 1e-2), one rank.
twin_figure() {
    "$PY" - "$WORK/twin.pt" <<'EOF'
import sys, torch
out = torch.load(sys.argv[1])
step = 2.0 ** (torch.log2(torch.tensor(out["size"])).floor().item() - 7)  # one bf16 step at the logits' size
ok = out["diff"] <= 2 * step and out["adapters"] > 4 * step and out["pytest_rc"] == 0
print(f"max |twin - engine| {out['diff']:.4g} = {out['diff'] / step:.2f} bf16 steps (LoRA moves logits by "
      f"{out['adapters']:.3g}); {len(out['calls'])} gathers of <= {max(out['calls'])} tensors; "
      f"bf16 LoRA test rc {out['pytest_rc']}")
sys.exit(0 if ok else 1)
EOF
}
twin_check() {
    "$PY" - "$WORK/twin.pt" <<'EOF' || return $?
import sys, torch
from dschat.runtime import dist
from tests.test_twin import twin_versus_engine, zero3_engine
dist.init_distributed()
engine, tok = zero3_engine(stage=3, dtype="bf16", lora_b=1e-2)
out = twin_versus_engine(engine, tok)
out["pytest_rc"] = -1
torch.save(out, sys.argv[1])
EOF
    "$PY" -m pytest -q -p no:cacheprovider -n 0 \
        "tests/test_gpu_correctness.py::test_hybrid_twin_logits_equal_the_bf16_lora_engine"
    local rc=$?
    "$PY" -c "import sys, torch; o = torch.load(sys.argv[1]); o['pytest_rc'] = $rc; torch.save(o, sys.argv[1])" \
        "$WORK/twin.pt"
}
if [[ $CHECKS == *" twin "* ]]; then
    export -f twin_check
    run twin 60 twin_check
    report twin "$RC" "$SECS" twin_figure
fi

# 4. Resume with --enable_ema under actor ZeRO-3 (the EMA shadow is part of the checkpoint).
resume_figure() {
    "$PY" - "$WORK/resume" "$WORK/resume.log" <<'EOF'
import json, sys
from pathlib import Path
out, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
m = json.loads((out / "actor/dschat_metrics.json").read_text())
resumed = "resuming from" in log
ema, steps = m.get("ema_updates"), m.get("actor_optimizer_steps")
ok = resumed and ema == steps and (steps or 0) >= 2 and (out / "actor_ema/config.json").is_file()
print(f"resumed: {resumed}, {m['ppo_steps']} PPO steps, EMA updates {ema} (needs one per actor optimizer step "
      f"across the resume: {steps})")
sys.exit(0 if ok else 1)
EOF
}
resume_check() {
    local flags=(--actor_model_name_or_path builtin --data_path dschat/builtin --data_output_path "$WORK/resume_data"
                 --reward_fn builtin_judge --advantage_estimator grpo --n_samples_per_prompt 2
                 --per_device_generation_batch_size 4 --per_device_training_batch_size 8 --max_answer_seq_len 8
                 --num_judge_prompts 4 --enable_test_mode --num_warmup_steps 0 --enable_ema --actor_zero_stage 3
                 --save_interval 1 --dtype bf16 --output_dir "$WORK/resume")
    "$PY" "$STEP3" "${flags[@]}" --test_stop_step 1 || return $?
    "$PY" "$STEP3" "${flags[@]}" --test_stop_step 2 --resume
}
if [[ $CHECKS == *" resume "* ]]; then
    export -f resume_check
    run resume 90 resume_check
    report resume "$RC" "$SECS" resume_figure
fi

if [ "$FAILED" -ne 0 ]; then
    echo "gpu_check: FAILED (logs in $WORK)"
    exit 1
fi
echo "gpu_check: all passed"
exit 0
