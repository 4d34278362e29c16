#!/bin/bash
# Step 2 (reward model) from SmolLM2-135M-Instruct's step-1 output on the builtin task, through its chat
# template. Without a GPU: CPU-sized (fp32, 1440 pairs of a --data_split 3,12,85 share, 1 epoch); with one:
# GPU-sized (bf16, the 2,4,4 split).
# Usage: bash run_smollm2_135m.sh [OUTPUT] [ZERO_STAGE] [BASE_MODEL] [more main.py flags; later flags win]
# BASE_MODEL: normally step 1's output (default: output/actor-models/smollm2-135m).
OUTPUT=$1
ZERO_STAGE=$2
BASE_MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)" || exit 1
OUTPUT=${OUTPUT:-"$STEP_DIR/../../output/reward-models/smollm2-135m"}
ZERO_STAGE=${ZERO_STAGE:-0}
BASE_MODEL=${BASE_MODEL:-"$STEP_DIR/../../output/actor-models/smollm2-135m"}
if [ -e "$BASE_MODEL" ]; then
    BASE_MODEL="$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")"
fi
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$STEP_DIR" || exit 1
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZED=(--data_split 2,4,4 --per_device_train_batch_size 16 --num_train_epochs 1 --learning_rate 1e-5
           --dtype bf16)
else
    SIZED=(--data_split 3,12,85 --per_device_train_batch_size 8 --num_train_epochs 1 --learning_rate 5e-5
           --dtype fp32)
fi
python main.py \
   --model_name_or_path "$BASE_MODEL" \
   --data_path dschat/builtin \
   --prompt_format auto \
   --max_seq_len 128 \
   --per_device_eval_batch_size 16 \
   --eval_iters 8 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 5 \
   --zero_stage "$ZERO_STAGE" \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
