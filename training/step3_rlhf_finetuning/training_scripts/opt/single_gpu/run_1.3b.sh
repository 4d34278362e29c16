#!/bin/bash
# DeepSpeed-Chat's step 3 for an OPT-1.3B actor and OPT-350M critic on a single GPU (actor LoRA 128,
# gradient checkpointing, hybrid engine).
# Usage: bash run_1.3b.sh [ACTOR] [CRITIC] [ACTOR_ZERO_STAGE] [CRITIC_ZERO_STAGE] [OUTPUT] [more main.py flags]
# Later flags override earlier ones. Works from any directory; relative paths are relative to where you
# run it. The log goes to $OUTPUT/training.log and the script exits with the training command's status.
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
if [ "$OUTPUT" == "" ]; then
    OUTPUT=./output
fi
if [ "$ACTOR_ZERO_STAGE" == "" ]; then
    ACTOR_ZERO_STAGE=0
fi
if [ "$CRITIC_ZERO_STAGE" == "" ]; then
    CRITIC_ZERO_STAGE=0
fi
if [ "$ACTOR_MODEL_PATH" == "" ]; then
    ACTOR_MODEL_PATH=AdamG012/chat-opt-1.3b-sft-deepspeed
fi
if [ "$CRITIC_MODEL_PATH" == "" ]; then
    CRITIC_MODEL_PATH=AdamG012/chat-opt-350m-reward-deepspeed
fi
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH; do  # local folders become absolute (the script changes directory)
    if [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$(dirname "${BASH_SOURCE[0]}")/../../.." || exit 1

# DeepSpeed-Chat's main.py defaulted to Dahoas/rm-static and learning rates 9.65e-6/5e-6; ours defaults to
# the builtin task and rates for its tiny models, so these are explicit.
deepspeed --num_gpus 1 main.py \
   --data_path Dahoas/rm-static \
   --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --num_padding_at_beginning 1 --gradient_accumulation_steps 2 \
   --deepspeed --actor_lora_dim 128 --enable_hybrid_engine --actor_gradient_checkpointing --actor_dropout 0.0 \
   --output_dir "$OUTPUT" "$@" &> "$OUTPUT/training.log"
exit $?
