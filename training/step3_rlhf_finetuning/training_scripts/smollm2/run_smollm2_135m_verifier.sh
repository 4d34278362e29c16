#!/bin/bash
# Step 3 of SmolLM2-135M-Instruct against a rule instead of a reward model: GRPO (4 answers per prompt) with
# the builtin task's judge as the reward by default (--reward_fn builtin_judge), through its chat template; no
# reward model or critic is built, so only step 1's output (or the base model itself) is needed. Sampling and
# every log-prob at temperature 0.7; held-out evaluation every 20 steps with 4 samples per prompt, and the best
# evaluated actor is the one saved. Without a GPU: CPU-sized (fp32, 60 steps of 4 prompts x 4 answers); with
# one: bf16, 16 prompts x 4 answers, one epoch of the phase-3 share.
# Arithmetic word problems from the base model: ... run_smollm2_135m_verifier.sh smollm2-135m "" OUT
#   --data_path dschat/arith --data_split 0,0,1 --reward_fn accuracy --save_best_by pass@1/accuracy
# Usage: bash run_smollm2_135m_verifier.sh [ACTOR] [ACTOR_ZERO_STAGE] [OUTPUT] [more main.py flags]
ACTOR_MODEL_PATH=$1
ACTOR_ZERO_STAGE=$2
OUTPUT=$3
shift $(( $# < 3 ? $# : 3 ))
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../../.." && pwd)" || exit 1
ACTOR_MODEL_PATH=${ACTOR_MODEL_PATH:-"$REPO/output/actor-models/smollm2-135m"}
ACTOR_ZERO_STAGE=${ACTOR_ZERO_STAGE:-0}
OUTPUT=${OUTPUT:-"$REPO/output/step3-models/smollm2-135m"}
if [ -e "$ACTOR_MODEL_PATH" ]; then  # a local folder becomes absolute (the script changes directory)
    ACTOR_MODEL_PATH="$(cd "$(dirname "$ACTOR_MODEL_PATH")" && pwd)/$(basename "$ACTOR_MODEL_PATH")"
fi
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
   --actor_zero_stage "$ACTOR_ZERO_STAGE" \
   --data_path dschat/builtin \
   --reward_fn builtin_judge \
   --prompt_format auto \
   --max_prompt_seq_len 128 \
   --max_answer_seq_len 24 \
   --actor_learning_rate 2e-5 \
   --advantage_estimator grpo \
   --n_samples_per_prompt 4 \
   --kl_ctl 0.02 \
   --temperature 0.7 \
   --logprobs_from_generation \
   --num_warmup_steps 5 \
   --num_judge_prompts 64 \
   --eval_n_samples 4 \
   --eval_interval 20 \
   --save_best_by reward_score \
   --enable_hybrid_engine \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
