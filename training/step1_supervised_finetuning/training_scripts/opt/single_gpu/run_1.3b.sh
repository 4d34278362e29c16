#!/bin/bash
# DeepSpeed-Chat's step 1 for OPT-1.3B on a single GPU (LoRA 128, gradient accumulation 8).
# Usage: bash run_1.3b.sh [OUTPUT] [ZERO_STAGE] [more main.py flags; later flags override earlier ones]
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with the training command's exit status.
OUTPUT=$1
ZERO_STAGE=$2
shift $(( $# < 2 ? $# : 2 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../../.." || exit 1

# DeepSpeed-Chat's main.py defaulted to Dahoas/rm-static; ours defaults to the builtin task, so it is explicit.
deepspeed --num_gpus 1 main.py --model_name_or_path facebook/opt-1.3b \
   --data_path Dahoas/rm-static \
   --gradient_accumulation_steps 8 --lora_dim 128 --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed --output_dir "$OUTPUT" "$@" &> "$OUTPUT/training.log"
exit $?
