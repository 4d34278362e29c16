#!/bin/bash
# Proof 2: align SmolLM2-135M-Instruct on Anthropic HH preference data, with held-out checks.
#   1. SFT on the chosen answers of train rows 0-10%          (step 1, run_smollm2_135m_hh.sh)
#   2. reward model on the pairs of train rows 10-30%          (step 2)
#      "gold" reward model on the pairs of train rows 30-50%   (step 2, --data_split 3,2,5: no shared pair)
#   3. rw_eval.py on the file's held-out split (no step trains on it): both reward models, the untrained
#      head on the SFT model, and the "longer answer wins" baseline on the same pairs
#   4. PPO (LoRA, shared frozen bases) on prompts of train rows 50-100%; held-out prompts are answered
#      before and after and scored by the reward model and by the gold one (reward hacking shows as the
#      reward model's score rising while the gold score falls)
# A step whose output is complete is skipped, so re-running resumes. Logs: <step output>/training.log.
# Usage: bash scripts/align_smollm2_hh.sh [OUTPUT_ROOT (default output/hh)]
set -o pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 1
ROOT=${1:-"$REPO/output/hh"}
mkdir -p "$ROOT" && ROOT="$(cd "$ROOT" && pwd)" || exit 1
export HH_DATA=${HH_DATA:-"$REPO/../shared/data/hh-rlhf-harmless-test.jsonl.gz"}
if [ ! -f "$HH_DATA" ]; then
    echo "error: HH_DATA=$HH_DATA: no such file (the Anthropic HH harmless preference file)" >&2
    exit 2
fi
SFT="$ROOT/actor-models/smollm2-135m"
RM="$ROOT/reward-models/smollm2-135m"
GOLD="$ROOT/gold-reward-models/smollm2-135m"
PPO="$ROOT/step3-models/smollm2-135m"
REPORT="$ROOT/report.txt"
S=training_scripts/smollm2/run_smollm2_135m_hh.sh

step() {  # step NAME DONE_MARKER_DIR LOG COMMAND...: run unless already complete, with its wall time
    local name=$1 done_dir=$2 log=$3
    shift 3
    if [ -f "$done_dir/dschat_complete.json" ]; then
        echo "$name: already complete in $done_dir (skipped)"
        return 0
    fi
    echo "$name: running (log: $log)"
    local start=$SECONDS
    "$@" || { echo "$name failed (exit $?); see $log" >&2; exit 1; }
    echo "$name: done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s" | tee -a "$REPORT.times"
}

step "step 1 SFT" "$SFT" "$SFT/training.log" bash "$REPO/training/step1_supervised_finetuning/$S" "$SFT" 0 smollm2-135m
step "step 2 reward model" "$RM" "$RM/training.log" bash "$REPO/training/step2_reward_model_finetuning/$S" "$RM" 0 "$SFT"
step "step 2 gold reward model" "$GOLD" "$GOLD/training.log" bash "$REPO/training/step2_reward_model_finetuning/$S" "$GOLD" 0 "$SFT" \
    --data_split 3,2,5
RW="python $REPO/training/step2_reward_model_finetuning/rw_eval.py --data_path $HH_DATA --max_seq_len 256"
if [ ! -f "$ROOT/heldout_pairs.txt" ]; then
    echo "held-out pairwise accuracy (rw_eval.py)"
    { $RW --model_name_or_path "$RM" && $RW --model_name_or_path "$GOLD" \
        && $RW --model_name_or_path "$SFT" --untrained_head; } 2>/dev/null | grep "pairwise accuracy" \
        > "$ROOT/heldout_pairs.tmp" && mv "$ROOT/heldout_pairs.tmp" "$ROOT/heldout_pairs.txt" || exit 1
fi
cat "$ROOT/heldout_pairs.txt"
step "step 3 PPO" "$PPO/actor" "$PPO/training.log" env GOLD="$GOLD" \
    bash "$REPO/training/step3_rlhf_finetuning/$S" "$SFT" "$RM" 0 0 "$PPO"
{
    echo "== held-out pairs =="; cat "$ROOT/heldout_pairs.txt"
    echo "== step 3 (held-out prompts) =="; sed -n '/^step 3 done/,$p' "$PPO/training.log"
    echo "== wall time =="; cat "$REPORT.times" 2>/dev/null
} > "$REPORT"
cat "$REPORT"
