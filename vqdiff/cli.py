"""`vqdiff` command line: train, sample, inspect. Each command is a thin layer over build/pipeline."""

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, ModelType, load_config

log = logging.getLogger("vqdiff")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def train_command(argv: list[str], expect: ModelType | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="vqdiff train", description="Train a model from a YAML config.")
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint of this run, if any) or a checkpoint directory")
    parser.add_argument("--init-from", default=None, help="start from these weights with a fresh optimizer")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_intermixed_args(argv)
    from . import build
    from .train.loop import train
    cfg = load_config(args.config, args.overrides)
    if expect is not None and cfg.model is not expect:
        raise ConfigError(f"{args.config} configures a {cfg.model.value!r} model; this script trains "
                          f"{expect.value!r} models")
    build.seed_everything(cfg.seed)
    task = build.build_task(cfg)
    run_dir = train(cfg, task, build.build_dataset(cfg), resume=args.resume, init_from=args.init_from,
                    progress=not args.no_progress)
    log.info("run directory: %s (checkpoints/, samples/, log.jsonl)", run_dir)
    return run_dir


def sample_ddpm_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff sample-ddpm", description="Sample a trained Gaussian DDPM.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", default=None, help="sampling steps: 50, or 'ddim50' (default: the config's)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="samples.png", help="PNG grid (scatter plot for 2-D data)")
    parser.add_argument("--gif", default=None, help="also write a denoising-progress animation")
    args = parser.parse_intermixed_args(argv)
    from .images import save_gif
    from .pipeline import DDPMPipeline, ddpm_picture, save_picture
    pipe = DDPMPipeline.from_checkpoint(args.checkpoint, device=args.device)
    steps = _steps(args.steps)
    if args.gif:
        frames = pipe.progress_frames(args.n, steps, args.sampler, args.eta, args.seed)
        save_gif(frames, args.gif)
        save_picture(frames[-1], args.out)
        log.info("wrote %s and %s", args.out, args.gif)
    else:
        save_picture(ddpm_picture(pipe.cfg, pipe(args.n, steps, args.sampler, args.eta, args.seed)), args.out)
        log.info("wrote %s", args.out)


def _steps(value):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def info_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff info", description="Parameter counts of a config's networks.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from . import build
    cfg = load_config(args.config, args.overrides)
    for part, count in build.parameter_counts(cfg).items():
        print(f"{part:<28} {count:>15,}")


COMMANDS = {
    "train": train_command,
    "sample-ddpm": sample_ddpm_command,
    "info": info_command,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: vqdiff {" + ",".join(COMMANDS) + "} ...\n"
              "  train        train a model from a YAML config (also: accelerate launch scripts/train_*.py)\n"
              "  sample-ddpm  sample a trained Gaussian DDPM into a PNG grid / GIF\n"
              "  info         parameter counts of a config's networks")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    _setup_logging()
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
