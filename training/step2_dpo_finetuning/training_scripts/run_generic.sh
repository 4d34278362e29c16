#!/bin/bash
# DPO (the step-2 alternative) of any causal LM folder or hub name, normally step 1's output; the frozen
# reference is a second copy of the same model. The learning rate is for 350M+ pretrained models (DPO
# papers and TRL use 5e-7..1e-6); the data defaults to main.py's (the builtin task).
# Usage: bash run_generic.sh OUTPUT ZERO_STAGE MODEL [more main.py flags; later flags override these]
# Launcher: DSCHAT_DEPLOYMENT=single_gpu (default; DSCHAT_NUM_GPUS ranks, default 1) | single_node
# (DSCHAT_NUM_GPUS or all GPUs) | multi_node (deepspeed --hostfile=$HOSTFILE, default /job/hostfile).
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with the training command's exit status.
OUTPUT=$1
ZERO_STAGE=$2
MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ZERO_STAGE" == "" ]; then
    ZERO_STAGE=2
fi
if [ "$MODEL" == "" ]; then
    echo "usage: $0 OUTPUT ZERO_STAGE MODEL [main.py flags...]" >&2
    exit 2
fi
if [ -e "$MODEL" ]; then
    MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
fi
case "${DSCHAT_DEPLOYMENT:-single_gpu}" in
    multi_node) LAUNCH=(deepspeed --hostfile="${HOSTFILE:-/job/hostfile}") ;;
    single_node) LAUNCH=(deepspeed ${DSCHAT_NUM_GPUS:+--num_gpus "$DSCHAT_NUM_GPUS"}) ;;
    *) LAUNCH=(deepspeed --num_gpus "${DSCHAT_NUM_GPUS:-1}") ;;
esac
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

"${LAUNCH[@]}" main.py \
   --model_name_or_path "$MODEL" \
   --per_device_train_batch_size 4 \
   --per_device_eval_batch_size 4 \
   --max_seq_len 512 \
   --learning_rate 5e-7 \
   --weight_decay 0.0 \
   --num_train_epochs 1 \
   --gradient_accumulation_steps 1 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 0 \
   --beta 0.1 \
   --seed 1234 \
   --zero_stage "$ZERO_STAGE" \
   --deepspeed \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
