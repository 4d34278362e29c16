#!/bin/bash
# DeepSpeed-Chat's step 2 for a Llama-2-7B reward model on one node: ZeRO-3 with CPU offload.
# Usage: bash run_llama2_7b.sh [OUTPUT] [ZERO_STAGE] [BASE_MODEL] [more main.py flags; later flags win]
# BASE_MODEL defaults to meta-llama/Llama-2-7b-hf (a hub name, a model folder or a step-1 output folder).
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with the training command's exit status.
OUTPUT=$1
ZERO_STAGE=$2
BASE_MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output_step2_llama_7b_epoch1_lr9.65e-6
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=3
fi
if [ "$BASE_MODEL" == "" ]; then
    BASE_MODEL=meta-llama/Llama-2-7b-hf
fi
if [ -e "$BASE_MODEL" ]; then
    BASE_MODEL="$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

deepspeed main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --model_name_or_path "$BASE_MODEL" \
   --per_device_train_batch_size 8 \
   --per_device_eval_batch_size 8 \
   --max_seq_len 512 \
   --learning_rate 9.65e-6 \
   --weight_decay 0.1 \
   --num_padding_at_beginning 0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --offload \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
