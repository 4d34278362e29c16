#!/bin/bash
# Step 1 (SFT) of the builtin tiny Llama on the builtin task: 1 rank, plain python, runs on CPU or 1 GPU.
# Usage: bash run_tiny_cpu.sh [OUTPUT] [ZERO_STAGE] [more main.py flags; later flags override earlier ones]
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with main.py's exit status.
OUTPUT=$1
ZERO_STAGE=$2
shift $(( $# < 2 ? $# : 2 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 1
if [ "$OUTPUT" == "" ]; then
    OUTPUT="$STEP_DIR/../../output/actor-models/builtin"
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$STEP_DIR" || exit 1

python main.py \
   --model_name_or_path builtin \
   --data_path dschat/builtin \
   --zero_stage "$ZERO_STAGE" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
