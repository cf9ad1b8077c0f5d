#!/usr/bin/env bash
# LoRA on a mini model, end to end, from the bundled corpus and task (no downloads):
#   bash recipes/tune/demo_mini.sh [RUN_DIR]
#   DEVICE=cuda CPMCTL="python -m cpmctl" bash recipes/tune/demo_mini.sh runs/demo     # about 2.5 minutes on one H100
# 1. a vocabulary and packed rows from cpmctl/assets/corpus, 2. a mini-10b model pretrained on them, 3. its
# ROUGE-L on lcsts-mini/test untuned, 4. LoRA tuning with recipes/tune/mini.yaml, 5. ROUGE-L with the adapter.
set -euo pipefail
RUN=${1:-runs/demo-lora}
DEVICE=${DEVICE:-auto}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
CPMCTL=${CPMCTL:-cpmctl}  # e.g. CPMCTL="python -m cpmctl" without the console script
CORPUS=cpmctl/assets/corpus/batch1.jsonl
TASK=cpmctl/assets/tasks/lcsts-mini
mkdir -p "$RUN"

[ -f "$RUN/vocab.txt" ] || $CPMCTL data vocab -i "$CORPUS" -o "$RUN/vocab.txt" --size 8192
[ -d "$RUN/packed/train" ] || $CPMCTL data pack -i "$CORPUS" --vocab "$RUN/vocab.txt" -o "$RUN/packed" --max-length 256
[ -d "$RUN/pretrain/final" ] || $CPMCTL pretrain model.init=mini-10b "model.vocab=$RUN/vocab.txt" \
    "data.train=$RUN/packed/train" "out_dir=$RUN/pretrain" "train.steps=$PRETRAIN_STEPS" train.batch_size=32 \
    train.lr=0.002 train.warmup_steps=200 "train.device=$DEVICE" train.valid_batches=0 train.save_every=1000
MODEL=$RUN/pretrain/final

$CPMCTL eval --task lcsts --data "$TASK" --model "$MODEL" --recipe recipes/eval/lcsts.yaml \
    --out "$RUN/eval-untuned" --json "eval.device=$DEVICE" | tee "$RUN/untuned.json"
$CPMCTL tune lora --task lcsts --model "$MODEL" --data "$TASK" --recipe recipes/tune/mini.yaml --out "$RUN/lora" \
    "train.device=$DEVICE" --resume --json > "$RUN/tune.json"
$CPMCTL eval --task lcsts --data "$TASK" --model "$MODEL" --adapter "$RUN/lora/best" --recipe recipes/eval/lcsts.yaml \
    --out "$RUN/eval-tuned" --json "eval.device=$DEVICE" | tee "$RUN/tuned.json"
python3 - "$RUN" <<'EOF'
import json, sys
run = sys.argv[1]
u, t = (json.load(open(f"{run}/{n}.json"))["metrics"] for n in ("untuned", "tuned"))
tune = json.load(open(f"{run}/tune.json"))
print(f"lcsts-mini test, beam 3: ROUGE-L untuned {u['rouge-l']:.2f} -> LoRA {t['rouge-l']:.2f} "
      f"(ROUGE-1 {u['rouge-1']:.2f} -> {t['rouge-1']:.2f}); {tune['trainable']:,} trainable parameters, "
      f"best dev epoch {tune['best']['epoch']} of {tune['epochs']}")
EOF
