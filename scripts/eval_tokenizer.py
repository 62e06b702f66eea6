"""Reconstruction quality of a trained tokenizer on Shapes images: PSNR and the shapes attribute metric.

    python scripts/eval_tokenizer.py --tokenizer outputs/vqvae_shapes/tokenizer --n 1000 --out recon.png
    python scripts/eval_tokenizer.py --tokenizer outputs/vqvae_shapes/tokenizer --split heldout --n 500

The heldout split shows every image with at least one colour-shape pair that the train split (the tokenizer's
training data) never has: whether the codes generalise to those pairs.

Prints the shapes metric per attribute on the reconstructions (what the tokenizer loses), the mean per-image PSNR
(dB) and the per-image accuracy of vqdiff.eval.shapes on the reconstructions
(and, for reference, on the originals), the number of distinct codes given to blank (all-background) patches,
and writes a grid: originals in odd rows, reconstructions below them.
"""

import argparse
import json

import torch
from tqdm import tqdm

from vqdiff.data.shapes import ShapesDataset
from vqdiff.errors import script_main
from vqdiff.eval.shapes import evaluate
from vqdiff.io.tokenizer import load_tokenizer
from vqdiff.images import make_grid
from vqdiff.train.vqvae_loop import image_loader, reconstruct
from vqdiff.train.vqvae_losses import psnr


@torch.inference_mode()
def blank_patch_codes(tokenizer, images: torch.Tensor, batch_size: int, device: str) -> tuple[int, float]:
    """Distinct codes over the tokens whose f x f pixel patch is all background (white), and the share of the most
    common one. A tokenizer whose codes describe their own patch gives one code; more mean the codes of empty
    canvas carry something else (where the objects are), which the text-to-image model then has to predict."""
    f = tokenizer.downsample_factor
    codes = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        tokens = tokenizer.encode(batch.to(device)).cpu()
        blank = (batch == 1).unflatten(2, (-1, f)).unflatten(4, (-1, f)).all(5).all(3).all(1)  # [B, h, w]
        codes.append(tokens[blank])
    codes = torch.cat(codes)
    if codes.numel() == 0:
        return 0, 0.0
    counts = codes.bincount()
    return int((counts > 0).sum()), float(counts.max() / codes.numel())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="trained tokenizer directory")
    parser.add_argument("--n", type=int, default=1000, help="images")
    parser.add_argument("--split", default="val", choices=("val", "heldout"))
    parser.add_argument("--seed", type=int, default=0, help="shapes data seed (data.seed of the training config)")
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="recon.png", help="reconstruction grid PNG")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer, args.device)
    size = tokenizer.config["resolution"]
    data = ShapesDataset(args.split, size=size, num_samples=args.n, seed=args.seed, max_objects=args.max_objects)
    originals, recons = [], []
    for batch in tqdm(image_loader(data, args.batch_size), desc="reconstructing"):
        originals.append(batch["image"])
        recons.append(reconstruct(tokenizer, batch["image"]))
    originals, recons = torch.cat(originals), torch.cat(recons)
    captions = [data.caption(i) for i in range(len(data))]
    report = evaluate(list(recons), captions)
    print("shapes metric on the reconstructions (what the tokenizer loses, per attribute):")
    print(report.table())
    result = {
        "tokenizer": args.tokenizer, "split": args.split, "images": len(data), "codes": tokenizer.num_embeddings,
        "token_grid": "x".join(map(str, tokenizer.encode(originals[:1].to(args.device)).shape[1:])),
        "psnr": float(psnr(recons, originals)),
        "shapes_accuracy_recon": report.groups["all"]["image"],
        "shapes_accuracy_original": evaluate(list(originals), captions).groups["all"]["image"],
    }
    result["blank_patch_codes"], result["blank_patch_top_code_share"] = blank_patch_codes(
        tokenizer, originals, args.batch_size, args.device)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    rows = [images for start in range(0, min(len(data), 32), 8)
            for images in (originals[start:start + 8], recons[start:start + 8])]
    make_grid([image for row in rows for image in row], nrow=8, scale=2).save(args.out)


if __name__ == "__main__":
    script_main(main, "eval_tokenizer.py")
