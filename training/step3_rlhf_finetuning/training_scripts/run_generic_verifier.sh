#!/bin/bash
# Step 3 for any actor (step-1 output) against rule-based rewards (no reward model, no critic): GRPO with 8
# answers per prompt, KL to the reference in the loss (k3, 0.001), DeepSpeed-Chat's ~1B learning rate. The
# reward defaults to accuracy (the final answer against each row's answer/solution/ground_truth column), so
# pass prompt-only data with reference answers: --data_path your.jsonl --data_split 0,0,1 --reward_fn ...
# Usage: bash run_generic_verifier.sh ACTOR [ACTOR_ZERO_STAGE] [OUTPUT] [more main.py flags]
# Launcher: DSCHAT_DEPLOYMENT=single_gpu (default; DSCHAT_NUM_GPUS ranks, default 1) | single_node
# (DSCHAT_NUM_GPUS or all GPUs) | multi_node (deepspeed --hostfile=$HOSTFILE, default /job/hostfile).
# Later flags override earlier ones. The log goes to $OUTPUT/training.log.
ACTOR_MODEL_PATH=$1
ACTOR_ZERO_STAGE=$2
OUTPUT=$3
shift $(( $# < 3 ? $# : 3 ))
if [ "$ACTOR_MODEL_PATH" == "" ]; then
    echo "usage: $0 ACTOR [ACTOR_ZERO_STAGE] [OUTPUT] [main.py flags...]" >&2
    exit 2
fi
OUTPUT=${OUTPUT:-./output}
ACTOR_ZERO_STAGE=${ACTOR_ZERO_STAGE:-2}
if [ -e "$ACTOR_MODEL_PATH" ]; then  # a local folder becomes absolute (the script changes directory)
    ACTOR_MODEL_PATH="$(cd "$(dirname "$ACTOR_MODEL_PATH")" && pwd)/$(basename "$ACTOR_MODEL_PATH")"
fi
case "${DSCHAT_DEPLOYMENT:-single_gpu}" in
    multi_node) LAUNCH=(deepspeed --hostfile="${HOSTFILE:-/job/hostfile}") ;;
    single_node) LAUNCH=(deepspeed ${DSCHAT_NUM_GPUS:+--num_gpus "$DSCHAT_NUM_GPUS"}) ;;
    *) LAUNCH=(deepspeed --num_gpus "${DSCHAT_NUM_GPUS:-1}") ;;
esac
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

"${LAUNCH[@]}" main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --reward_fn accuracy \
   --advantage_estimator grpo \
   --n_samples_per_prompt 8 \
   --per_device_generation_batch_size 4 \
   --per_device_training_batch_size 16 \
   --max_answer_seq_len 512 \
   --max_prompt_seq_len 512 \
   --actor_learning_rate 1e-6 \
   --use_kl_loss --kl_estimator k3 --kl_ctl 0.001 \
   --num_train_epochs 1 \
   --lr_scheduler_type constant \
   --num_warmup_steps 10 \
   --eval_n_samples 4 \
   --deepspeed --seed 1234 \
   --enable_hybrid_engine \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --output_dir "$OUTPUT" \
   --enable_tensorboard \
   --tensorboard_path "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
