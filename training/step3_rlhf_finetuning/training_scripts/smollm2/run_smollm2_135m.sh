#!/bin/bash
# Step 3 (PPO) of SmolLM2-135M-Instruct's step-1 actor against its step-2 reward model on the builtin
# task, through its chat template, with RLOO (4 answers per prompt, each one's baseline the mean reward of the
# other three; no critic is trained, the reward model only scores). Without a GPU: CPU-sized (fp32, 60 steps of
# 4 prompts x 4 answers from the --data_split 3,12,85 share, hybrid generation); with one: GPU-sized (bf16,
# 1 epoch of the 2,4,4 split, 16 prompts x 4 answers per step).
# Usage: bash run_smollm2_135m.sh [ACTOR] [CRITIC] [ACTOR_ZERO] [CRITIC_ZERO] [OUTPUT] [more main.py flags]
ACTOR_MODEL_PATH=$1
CRITIC_MODEL_PATH=$2
ACTOR_ZERO_STAGE=$3
CRITIC_ZERO_STAGE=$4
OUTPUT=$5
shift $(( $# < 5 ? $# : 5 ))
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)" || exit 1
ACTOR_MODEL_PATH=${ACTOR_MODEL_PATH:-"$REPO/output/actor-models/smollm2-135m"}
CRITIC_MODEL_PATH=${CRITIC_MODEL_PATH:-"$REPO/output/reward-models/smollm2-135m"}
ACTOR_ZERO_STAGE=${ACTOR_ZERO_STAGE:-0}
CRITIC_ZERO_STAGE=${CRITIC_ZERO_STAGE:-0}
OUTPUT=${OUTPUT:-"$REPO/output/step3-models/smollm2-135m"}
for v in ACTOR_MODEL_PATH CRITIC_MODEL_PATH; do  # local folders become absolute (the script changes directory)
    if [ -e "${!v}" ]; then
        printf -v "$v" '%s' "$(cd "$(dirname "${!v}")" && pwd)/$(basename "${!v}")"
    fi
done
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$REPO/training/step3_rlhf_finetuning" || exit 1
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZED=(--data_split 2,4,4 --per_device_generation_batch_size 16 --per_device_training_batch_size 16
           --dtype bf16)
else
    SIZED=(--data_split 3,12,85 --per_device_generation_batch_size 4 --per_device_training_batch_size 16
           --dtype fp32 --enable_test_mode --test_stop_step 60)
fi
python main.py \
   --actor_model_name_or_path "$ACTOR_MODEL_PATH" \
   --critic_model_name_or_path "$CRITIC_MODEL_PATH" \
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --critic_zero_stage "$CRITIC_ZERO_STAGE" \
   --data_path dschat/builtin \
   --prompt_format auto \
   --max_prompt_seq_len 96 \
   --max_answer_seq_len 24 \
   --actor_learning_rate 3e-5 \
   --advantage_estimator rloo \
   --n_samples_per_prompt 4 \
   --logprobs_from_generation \
   --num_warmup_steps 5 \
   --num_judge_prompts 64 \
   --enable_hybrid_engine \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
