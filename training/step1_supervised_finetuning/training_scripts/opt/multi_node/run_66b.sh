#!/bin/bash
# DeepSpeed-Chat's step 1 for OPT-66B on several nodes (LoRA 128, gradient checkpointing, ZeRO-3).
# Usage: HOSTFILE=/path/to/hostfile bash run_66b.sh [OUTPUT] [ZERO_STAGE] [more main.py flags]
# HOSTFILE defaults to /job/hostfile (the deepspeed launcher's default). Works from any directory;
# relative paths are relative to where you run it. The log goes to $OUTPUT/training.log and the
# script exits with the training command's exit status.
OUTPUT=$1
ZERO_STAGE=$2
shift $(( $# < 2 ? $# : 2 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=3
fi
HOSTFILE=${HOSTFILE:-/job/hostfile}
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../../.." || exit 1

deepspeed --hostfile="$HOSTFILE" main.py \
   --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
   --data_split 2,4,4 \
   --model_name_or_path facebook/opt-66b \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 1e-4 \
   --weight_decay 0.1 \
   --num_train_epochs 2 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --seed 1234 \
   --gradient_checkpointing \
   --zero_stage "$ZERO_STAGE" \
   --lora_dim 128 \
   --lora_module_name decoder.layers. \
   --deepspeed \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
