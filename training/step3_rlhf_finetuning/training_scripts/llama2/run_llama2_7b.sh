#!/bin/bash
# DeepSpeed-Chat's step 3 for a Llama-2-7B actor and critic on one node (ZeRO-3, reference model
# offloaded, gradient checkpointing, hybrid engine).
# Usage: bash run_llama2_7b.sh [ACTOR] [CRITIC] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [more main.py flags]
# Later flags override earlier ones. Works from any directory; relative paths are relative to where you
# run it. The log goes to $OUTPUT/training.log and the script exits with the training command's status.
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output_step3_llama
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=3
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=3
fi
if [ "$ACTOR_MODEL_PATH" == "" ] || [ "$CRITIC_MODEL_PATH" == "" ]; then
    echo "usage: $0 ACTOR CRITIC [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [main.py flags...]" >&2
    exit 2
fi
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH; do  # local folders become absolute (the script changes directory)
    if [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

deepspeed --master_port 12346 main.py \
   --data_path Dahoas/rm-static \
   --data_split 2,4,4 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --num_padding_at_beginning 1 \
   --per_device_generation_batch_size 1 \
   --per_device_training_batch_size 1 \
   --generation_batches 1 \
   --ppo_epochs 1 \
   --max_answer_seq_len 256 \
   --max_prompt_seq_len 256 \
   --actor_learning_rate 9.65e-6 \
   --critic_learning_rate 5e-6 \
   --actor_weight_decay 0.1 \
   --critic_weight_decay 0.1 \
   --num_train_epochs 1 \
   --lr_scheduler_type cosine \
   --gradient_accumulation_steps 1 \
   --actor_gradient_checkpointing \
   --critic_gradient_checkpointing \
   --offload_reference_model \
   --actor_dropout 0.0 \
   --num_warmup_steps 100 \
   --deepspeed --seed 1234 \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --enable_hybrid_engine \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
