#!/bin/bash
# Step 3 of the builtin tiny actor against a rule instead of a reward model: GRPO (4 answers per prompt, each
# one's advantage its reward against the group's mean and std) with the builtin task's judge as the reward
# (--reward_fn builtin_judge; a later --reward_fn replaces it). No reward model and no critic are built, so
# this needs only step 1's output. 300 steps of 4 prompts x 4 answers from the --data_split 4.5,4.5,1 share
# (prompts disjoint from step 1's 2,4,4 share and from the judge's held-out prompts); 1 rank, CPU or 1 GPU.
# Usage: bash run_tiny_cpu_verifier.sh [ACTOR] [ACTOR_ZERO_STAGE] [OUTPUT] [more main.py flags]
# ACTOR defaults to the e2e output folder (<repo>/output/actor-models/builtin). The log goes to
# $OUTPUT/training.log and the script exits with main.py's exit status.
ACTOR_MODEL_PATH=$1
ACTOR_ZERO_STAGE=$2
OUTPUT=$3
shift $(( $# < 3 ? $# : 3 ))
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)" || exit 1
ACTOR_MODEL_PATH=${ACTOR_MODEL_PATH:-"$REPO/output/actor-models/builtin"}
ACTOR_ZERO_STAGE=${ACTOR_ZERO_STAGE:-0}
OUTPUT=${OUTPUT:-"$REPO/output/step3-models/builtin"}
if [ -e "$ACTOR_MODEL_PATH" ]; then  # a local folder becomes absolute (the script changes directory)
    ACTOR_MODEL_PATH="$(cd "$(dirname "$ACTOR_MODEL_PATH")" && pwd)/$(basename "$ACTOR_MODEL_PATH")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$REPO/training/step3_rlhf_finetuning" || exit 1

python main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --reward_fn builtin_judge \
   --advantage_estimator grpo \
   --n_samples_per_prompt 4 \
   --per_device_generation_batch_size 4 \
   --data_split 4.5,4.5,1 \
   --kl_ctl 0.02 \
   --enable_hybrid_engine \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
