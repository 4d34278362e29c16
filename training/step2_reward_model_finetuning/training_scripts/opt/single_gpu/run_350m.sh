#!/bin/bash
# DeepSpeed-Chat's step 2 for an OPT-350M reward model on one GPU.
# Usage: bash run_350m.sh [OUTPUT] [ZERO_STAGE] [BASE_MODEL] [more main.py flags; later flags win]
# BASE_MODEL defaults to facebook/opt-350m (a hub name, a model folder or a step-1 output folder).
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with the training command's exit status.
OUTPUT=$1
ZERO_STAGE=$2
BASE_MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=0
fi
if [ "$BASE_MODEL" == "" ]; then
    BASE_MODEL=facebook/opt-350m
fi
if [ -e "$BASE_MODEL" ]; then
    BASE_MODEL="$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../../.." || exit 1

deepspeed --num_gpus 1 main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path "$BASE_MODEL" \
   --num_padding_at_beginning 1 \
   --learning_rate 5e-5 \
   --num_train_epochs 1 \
   --weight_decay 0.1 \
   --dropout 0.0 \
   --gradient_accumulation_steps 4 \
   --zero_stage "$ZERO_STAGE" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
