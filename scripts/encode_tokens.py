"""Encode a data set once with a trained tokenizer into a memory-mapped token cache for VQ-Diffusion training.

    python scripts/encode_tokens.py --tokenizer runs/vqvae_shapes/tokenizer --config configs/vqvae_shapes.yaml \
        --split train --out tokens/shapes_train

The config's data section says which data set (and image size); the cache records the data set's fingerprint
and the tokenizer's hash, and TokenDataset refuses it when either changes.
"""

import argparse
import logging

from vqdiff import build
from vqdiff.config import load_config
from vqdiff.errors import script_main
from vqdiff.io.token_cache import encode_token_cache

log = logging.getLogger("encode_tokens")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="trained tokenizer directory (<run>/tokenizer)")
    parser.add_argument("--config", required=True, help="YAML config whose data section names the data set")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", required=True, help="output directory (replaced when complete)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    dataset = build.build_tokenizer_data(cfg, args.split)
    out = encode_token_cache(args.tokenizer, dataset, args.out, args.batch_size, args.device, cfg.data.num_workers,
                             progress=not args.no_progress)
    log.info("wrote %d token grids to %s", len(dataset), out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    script_main(main, "encode_tokens.py")
