"""Train the Gumbel VQ-VAE tokenizer, then write its trimmed `<run>/tokenizer/` directory.

    accelerate launch scripts/train_vqvae.py --config configs/vqvae_shapes.yaml [--resume auto] [key=value ...]
    python scripts/train_vqvae.py --config configs/vqvae_shapes.yaml train.max_steps=100
"""

import argparse
import logging

import torch

from vqdiff import build
from vqdiff.config import ConfigError, ModelType, load_config
from vqdiff.errors import script_main
from vqdiff.train.tasks import build_vqvae_loss
from vqdiff.train.vqvae_loop import train_vqvae

log = logging.getLogger("train_vqvae")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with model: vqvae (configs/vqvae_*.yaml)")
    parser.add_argument("--resume", default=None, help="'auto' (latest checkpoint of this run) or a checkpoint dir")
    parser.add_argument("--val-images", type=int, default=1000,
                        help="val images for the recon grids and the trimmed tokenizer's PSNR (0: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="the run directory holds an earlier run: delete it and start over")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.model is not ModelType.VQVAE:
        raise ConfigError(f"{args.config} configures a {cfg.model.value!r} model; this script trains 'vqvae'")
    torch.manual_seed(cfg.seed)
    model, loss = build.build_tokenizer(cfg), build_vqvae_loss(cfg)
    dataset = build.build_tokenizer_data(cfg, "train")
    val = None
    if args.val_images > 0:
        try:
            val = build.build_tokenizer_data(cfg, "val")
            val = torch.utils.data.Subset(val, range(min(args.val_images, len(val))))
        except (ConfigError, FileNotFoundError) as error:
            log.warning("no val split (%s): grids show training images, no val PSNR", error)
    run_dir = train_vqvae(cfg, model, loss, dataset, resume=args.resume, progress=not args.no_progress,
                          val_dataset=val, overwrite=args.overwrite)
    log.info("run directory: %s (tokenizer/, checkpoints/, samples/, log.jsonl)", run_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    script_main(main, "train_vqvae.py")
