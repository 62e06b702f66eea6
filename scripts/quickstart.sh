#!/usr/bin/env bash
# The main job on the embedded shapes data, no download: render shapes, train the tiny tokenizer, cache its
# tokens, train the tiny text-to-image model, sample prompts and score them. Pictures in outputs/quickstart/.
# Extra arguments are config overrides for the text-to-image run (e.g. train.max_steps=500).
VQDIFF_EXTRAS=""
source "$(dirname "$0")/env.sh"
OUT=outputs/quickstart
mkdir -p "$OUT"
echo "== 1/4: tokenizer (Gumbel VQ-VAE, 32 px shapes -> 8x8 tokens)"
python scripts/train_vqvae.py --config configs/vqvae_tiny.yaml out_dir=$OUT/vqvae_tiny --resume auto --val-images 200
echo "== 2/4: token cache of the training images"
python scripts/encode_tokens.py --tokenizer $OUT/vqvae_tiny/tokenizer --config configs/shapes_tiny.yaml \
    --out $OUT/tokens_tiny
echo "== 3/4: text-to-image VQ-Diffusion (transformer + small CLIP-BPE text tower)"
python scripts/train_vq.py --config configs/shapes_tiny.yaml out_dir=$OUT/shapes_tiny --resume auto "$@"
echo "== 4/4: sampling and scoring"
python scripts/sample_vq.py "a large red circle at the top left" "a small blue square at the center" \
    "a large green triangle at the bottom right" "a small yellow diamond at the top" \
    --model $OUT/shapes_tiny --n 4 --out $OUT/samples.png --gif $OUT/unmasking.gif
python scripts/eval_shapes.py --checkpoint $OUT/shapes_tiny --n 100 --splits val,heldout --grid $OUT/eval_grid.png \
    --json $OUT/eval.json
echo "pictures: $OUT/samples.png (4 prompts x 4 samples), $OUT/unmasking.gif, $OUT/eval_grid.png (scored prompts,"
echo "  wrong objects outlined); training grids in $OUT/*/samples/"
python - "$OUT/eval.json" <<'PY'
import json, sys
groups = json.load(open(sys.argv[1]))["report"]["groups"]
print(f"score: {100 * groups['seen']['image']:.0f}% of prompts with seen colour-shape pairs and "
      f"{100 * groups['held-out']['image']:.0f}% with pairs never in training drew the named shape in the named "
      f"colour, size and place")
PY
