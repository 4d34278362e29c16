#!/bin/bash
# Step 2 (reward model) from SmolLM2-135M-Instruct's HH step-1 output on Anthropic HH preference data,
# through its chat template. Pairs: phase 2 of --data_split 1,2,7 (the file's train rows 10-30%); the
# "gold" reward model of scripts/align_smollm2_hh.sh passes --data_split 3,2,5 (rows 30-50%), so the two
# never share a pair. Without a GPU: CPU-sized (fp32, 256 tokens, 1 epoch); with one: GPU-sized (bf16,
# 512 tokens, 2 epochs).
# Usage: bash run_smollm2_135m_hh.sh [OUTPUT] [ZERO_STAGE] [BASE_MODEL] [more main.py flags; later flags win]
# HH_DATA=<file> picks another preference file (default: ../shared/data/hh-rlhf-harmless-test.jsonl.gz).
OUTPUT=$1
ZERO_STAGE=$2
BASE_MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)" || exit 1
OUTPUT=${OUTPUT:-"$STEP_DIR/../../output/hh/reward-models/smollm2-135m"}
ZERO_STAGE=${ZERO_STAGE:-0}
BASE_MODEL=${BASE_MODEL:-"$STEP_DIR/../../output/hh/actor-models/smollm2-135m"}
if [ -e "$BASE_MODEL" ]; then
    BASE_MODEL="$(cd "$(dirname "$BASE_MODEL")" && pwd)/$(basename "$BASE_MODEL")"
fi
DATA=${HH_DATA:-"$STEP_DIR/../../../shared/data/hh-rlhf-harmless-test.jsonl.gz"}
DATA="$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")" || exit 1
mkdir -p "$OUTPUT" && OUTPUT="$(cd "$OUTPUT" && pwd)" || exit 1
cd "$STEP_DIR" || exit 1
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    SIZED=(--max_seq_len 512 --per_device_train_batch_size 16 --num_train_epochs 2 --dtype bf16)
else
    SIZED=(--max_seq_len 256 --per_device_train_batch_size 8 --num_train_epochs 1 --dtype fp32)
fi
python main.py \
   --model_name_or_path "$BASE_MODEL" \
   --data_path "$DATA" \
   --data_split 1,2,7 \
   --prompt_format auto \
   --learning_rate 2e-5 \
   --per_device_eval_batch_size 8 \
   --eval_iters 100 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 3 \
   --zero_stage "$ZERO_STAGE" \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
