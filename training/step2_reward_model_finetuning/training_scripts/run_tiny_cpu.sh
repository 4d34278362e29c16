#!/bin/bash
# Step 2 (reward model) on the builtin task: 1 rank, plain python, runs on CPU or 1 GPU.
# Usage: bash run_tiny_cpu.sh [OUTPUT] [ZERO_STAGE] [BASE_MODEL] [more main.py flags; later flags win]
# BASE_MODEL: the causal LM the reward model starts from (default: the builtin model; pass step 1's
# output folder to start from the SFT model). Works from any directory; relative paths are relative to
# where you run it. The log goes to $OUTPUT/training.log and the script exits with main.py's exit status.
OUTPUT=$1
ZERO_STAGE=$2
BASE_MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 1
if [ "$OUTPUT" == "" ]; then
    OUTPUT="$STEP_DIR/../../output/reward-models/builtin"
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
if [ "$BASE_MODEL" == "" ]; then
    BASE_MODEL=builtin
fi
if [ -e "$BASE_MODEL" ]; then  # a local folder becomes absolute (the script changes directory)
    BASE_MODEL="$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$STEP_DIR" || exit 1

python main.py \
   --model_name_or_path "$BASE_MODEL" \
   --data_path dschat/builtin \
   --zero_stage "$ZERO_STAGE" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
