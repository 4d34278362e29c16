#!/bin/bash
# Step 3 (PPO RLHF) for any actor (step-1 output) and critic (step-2 output). The values below are
# DeepSpeed-Chat's for a ~1B actor on one node; the prompts default to main.py's (the builtin task).
# Usage: bash run_generic.sh ACTOR CRITIC [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [more main.py flags]
# Later flags override earlier ones.
# Launcher: DSCHAT_DEPLOYMENT=single_gpu (default; DSCHAT_NUM_GPUS ranks, default 1) | single_node
# (DSCHAT_NUM_GPUS or all GPUs) | multi_node (deepspeed --hostfile=$HOSTFILE, default /job/hostfile).
# Works from any directory; relative paths are relative to where you run it. The log goes to
# $OUTPUT/training.log and the script exits with the training command's exit status.
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
if [ "$ACTOR_MODEL_PATH" == "" ] || [ "$CRITIC_MODEL_PATH" == "" ]; then
    echo "usage: $0 ACTOR CRITIC [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [main.py flags...]" >&2
    exit 2
fi
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=2
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=2
fi
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH; do  # local folders become absolute (the script changes directory)
    if [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
case "${DSCHAT_DEPLOYMENT:-single_gpu}" in
    multi_node) LAUNCH=(deepspeed --hostfile="${HOSTFILE:-/job/hostfile}") ;;
    single_node) LAUNCH=(deepspeed ${DSCHAT_NUM_GPUS:+--num_gpus "$DSCHAT_NUM_GPUS"}) ;;
    *) LAUNCH=(deepspeed --num_gpus "${DSCHAT_NUM_GPUS:-1}") ;;
esac
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

"${LAUNCH[@]}" main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 4 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --actor_dropout 0.0 \
   --num_warmup_steps 100 \
   --deepspeed --seed 1234 \
   --enable_hybrid_engine \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --output_dir "$OUTPUT" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
