#!/bin/bash
# Step 3 (PPO) of SmolLM2-135M-Instruct's HH step-1 actor against its HH step-2 reward model, through its
# chat template, with LoRA on actor and critic (--only_optimize_lora: the reference is the actor with its
# adapters off, the reward model the critic with its adapters off). Prompts: phase 3 of --data_split
# 1,4,5 (the file's train rows 50-100%); evaluation: greedy answers to held-out prompts (the file's eval
# split), scored by the reward model and, with GOLD=<step-2 dir>, by a second "gold" reward model.
# Without a GPU: CPU-sized (fp32, prompts up to 128 tokens, 32-token answers, 40 PPO steps of 8 prompts);
# with one: GPU-sized (bf16, prompts up to 256 tokens, 64-token answers, 1 epoch, batch 16).
# Usage: bash run_smollm2_135m_hh.sh [ACTOR] [CRITIC] [ACTOR_ZERO] [CRITIC_ZERO] [OUTPUT] [more main.py flags]
# HH_DATA=<file> picks another preference file (default: ../shared/data/hh-rlhf-harmless-test.jsonl.gz).
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)" || exit 1
ACTOR_MODEL_PATH=${ACTOR_MODEL_PATH:-"$REPO/output/hh/actor-models/smollm2-135m"}
CRITIC_MODEL_PATH=${CRITIC_MODEL_PATH:-"$REPO/output/hh/reward-models/smollm2-135m"}
ACTOR_ZERO_STAGE=${ACTOR_ZERO_STAGE:-0}
CRITIC_ZERO_STAGE=${CRITIC_ZERO_STAGE:-0}
OUTPUT=${OUTPUT:-"$REPO/output/hh/step3-models/smollm2-135m"}
DATA=${HH_DATA:-"$REPO/../shared/data/hh-rlhf-harmless-test.jsonl.gz"}
GOLD_FLAGS=()
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH DATA GOLD; do  # local paths become absolute (the script changes directory)
    if [ -n "${!v}" ] && [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
if [ -n "$GOLD" ]; then
    GOLD_FLAGS=(--gold_reward_model "$GOLD")
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$REPO/training/step3_rlhf_finetuning" || exit 1
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZED=(--max_prompt_seq_len 256 --max_answer_seq_len 64 --per_device_generation_batch_size 16
           --per_device_training_batch_size 16 --dtype bf16)
else
    SIZED=(--max_prompt_seq_len 128 --max_answer_seq_len 32 --per_device_generation_batch_size 8
           --per_device_training_batch_size 8 --dtype fp32 --enable_test_mode --test_stop_step 40)
fi
python main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --data_path "$DATA" \
   --data_split 1,4,5 \
   --prompt_format auto \
   --actor_lora_dim 16 \
   --critic_lora_dim 16 \
   --only_optimize_lora \
   --actor_lora_learning_rate 2e-4 \
   --critic_lora_learning_rate 2e-4 \
   --num_warmup_steps 3 \
   --num_judge_prompts 48 \
   --enable_hybrid_engine \
   "${GOLD_FLAGS[@]}" \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
