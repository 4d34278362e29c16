#!/bin/bash
# Step 3 (PPO RLHF) of the builtin tiny models: 1 rank, plain python, runs on CPU or 1 GPU. PPO settings
# are main.py's defaults (tuned for the builtin task).
# Usage: bash run_tiny_cpu.sh [ACTOR] [CRITIC] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [more main.py flags]
# ACTOR/CRITIC default to the e2e output folders (<repo>/output/{actor,reward}-models/builtin). Works from
# any directory; relative paths are relative to where you run it. The log goes to $OUTPUT/training.log
# and the script exits with main.py's exit status.
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)" || exit 1
if [ "$ACTOR_MODEL_PATH" == "" ]; then
    ACTOR_MODEL_PATH="$REPO/output/actor-models/builtin"
fi
if [ "$CRITIC_MODEL_PATH" == "" ]; then
    CRITIC_MODEL_PATH="$REPO/output/reward-models/builtin"
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=0
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=0
fi
if [ "$OUTPUT" == "" ]; then
    OUTPUT="$REPO/output/step3-models/builtin"
fi
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH; do  # local folders become absolute (the script changes directory)
    if [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$REPO/training/step3_rlhf_finetuning" || exit 1

python main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --enable_hybrid_engine \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
