#!/usr/bin/env bash
# The main job on the embedded data, no download: trains the 2-D S-curve DDPM and a small DDPM on the
# shapes images, then samples both. Pictures land in outputs/quickstart/.
VQDIFF_EXTRAS=""
source "$(dirname "$0")/env.sh"
OUT=outputs/quickstart
mkdir -p "$OUT"
echo "== 1/2: Gaussian DDPM on the 2-D S-curve (MLP denoiser)"
python scripts/train_ddpm.py --config configs/ddpm_scurve.yaml out_dir=$OUT/ddpm_scurve "$@"
python scripts/sample_ddpm.py --checkpoint $OUT/ddpm_scurve --n 2000 --out $OUT/ddpm_scurve.png \
    --gif $OUT/ddpm_scurve.gif
echo "== 2/2: small Gaussian DDPM on 32 px shapes images (UNet)"
python scripts/train_ddpm.py --config configs/ddpm_shapes32.yaml out_dir=$OUT/ddpm_shapes32 "$@"
python scripts/sample_ddpm.py --checkpoint $OUT/ddpm_shapes32 --n 16 --steps ddim50 --sampler ddim \
    --out $OUT/ddpm_shapes32.png --gif $OUT/ddpm_shapes32.gif
echo "pictures: $OUT/ddpm_scurve.png $OUT/ddpm_scurve.gif $OUT/ddpm_shapes32.png $OUT/ddpm_shapes32.gif"
