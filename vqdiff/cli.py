"""`vqdiff` command line: train, sample, inspect. Each command is a thin layer over build/pipeline."""

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, ModelType, load_config
from .errors import UserError, run_main
from .options import Sampler, SamplingStrategy
from .validation import check_counts, check_sampling_options, parse_steps

log = logging.getLogger("vqdiff")
DTYPES = ("float32", "bfloat16", "float16")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def train_command(argv: list[str], expect: ModelType | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="vqdiff train", description="Train a model from a YAML config.")
    parser.add_argument("--config", required=True, help="YAML experiment config (configs/*.yaml)")
    parser.add_argument("--resume", default=None,
                        help="'auto' (latest checkpoint of this run, if any) or a checkpoint directory")
    parser.add_argument("--init-from", default=None, help="start from these weights with a fresh optimizer")
    parser.add_argument("--overwrite", action="store_true",
                        help="the run directory holds an earlier run: delete it and start over")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_intermixed_args(argv)
    from .build import build_train_dataset
    from .train.loop import train
    from .train.tasks import build_task, prepare_config, seed_everything
    cfg = load_config(args.config, args.overrides)
    if expect is not None and cfg.model is not expect:
        raise ConfigError(f"{args.config} configures a {cfg.model.value!r} model; this script trains "
                          f"{expect.value!r} models")
    seed_everything(cfg.seed)
    cfg = prepare_config(cfg)
    run_dir = train(cfg, build_task(cfg), build_train_dataset(cfg), resume=args.resume, init_from=args.init_from,
                    progress=not args.no_progress, overwrite=args.overwrite)
    log.info("run directory: %s (checkpoints/, samples/, log.jsonl)", run_dir)
    return run_dir


def sample_ddpm_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff sample-ddpm", description="Sample a trained Gaussian DDPM.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", default=None, help="sampling steps: 50, or 'ddim50' (default: the config's)")
    parser.add_argument("--sampler", choices=Sampler.values(), default=None)
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="samples.png", help="PNG grid (scatter plot for 2-D data)")
    parser.add_argument("--gif", default=None, help="also write a denoising-progress animation")
    args = parser.parse_intermixed_args(argv)
    check_counts(n=args.n)
    check_sampling_options(eta=args.eta)
    steps = parse_steps(args.steps)
    from .images import save_gif
    from .pipeline import DDPMPipeline, save_picture
    pipe = DDPMPipeline.from_pretrained(args.checkpoint, device=args.device)
    if args.gif:
        frames = pipe.progress_frames(args.n, steps, args.sampler, args.eta, args.seed)
        save_gif(frames, args.gif)
        save_picture(frames[-1], args.out)
        log.info("wrote %s and %s", args.out, args.gif)
    else:
        samples = pipe(args.n, steps, args.sampler, args.eta, args.seed)
        if not bool(samples.isfinite().all()):
            raise UserError(f"the samples of {args.checkpoint} hold NaN or infinite values: its weights are broken "
                            "(a diverged run?); nothing was written")
        save_picture(pipe.picture(samples), args.out)
        log.info("wrote %s", args.out)


def sample_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff sample", description="Text-prompt sampling from a trained model.")
    parser.add_argument("prompts", nargs="*", help="one or more prompts")
    parser.add_argument("--model", required=True, help="pipeline directory, run directory or checkpoint")
    parser.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", default=None,
                        help="network calls (default: the config's, else T); Gaussian models also 'ddim25'")
    parser.add_argument("--sampler", choices=Sampler.values(), default=None, help="Gaussian models only")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--truncation", type=float, default=None, help="keep this share of p(x0|xt) per token")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--strategy", choices=SamplingStrategy.values(), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast the transformer (e.g. bfloat16 on a GPU); default float32")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the transformer (GPU; MODE reduce-overhead adds CUDA graphs)")
    parser.add_argument("--out", default="samples.png", help="grid PNG with each prompt under its images")
    parser.add_argument("--gif", default=None, help="also write the unmasking progress as an animation")
    parser.add_argument("--init-image", default=None, help="inpainting: the image to start from")
    parser.add_argument("--mask", default=None, help="inpainting: white = regenerate, black = keep")
    args = parser.parse_intermixed_args(argv)
    check_counts(n=args.n)
    check_sampling_options(args.guidance, args.truncation, args.temperature)
    steps = parse_steps(args.steps)
    import torch
    from PIL import Image
    from .images import make_grid, save_gif
    from .pipeline import load_pipeline, save_picture
    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt given: pass prompts as arguments or --prompts-file FILE")
    if (args.init_image is None) != (args.mask is None):
        raise ConfigError("inpainting needs both --init-image and --mask")
    prompts = [p for p in prompts for _ in range(args.n)]
    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    vq = pipe.cfg.model is ModelType.VQ_DIFFUSION
    if not vq and args.init_image:
        raise ConfigError("inpainting (--init-image, --mask) is implemented for VQ-Diffusion models only")
    if vq and args.sampler:
        raise ConfigError("--sampler chooses a Gaussian sampler; VQ-Diffusion takes --strategy")
    if args.compile:
        pipe.compile(args.compile)
    options = dict(steps=steps, guidance_scale=args.guidance, truncation_rate=args.truncation,
                   temperature=args.temperature, strategy=args.strategy)
    if args.sampler:
        options["sampler"] = args.sampler
    generator = torch.Generator(args.device).manual_seed(args.seed)
    nrow = args.n if args.n > 1 else min(8, len(prompts))
    if args.init_image:
        images = pipe.inpaint(prompts, Image.open(args.init_image), Image.open(args.mask), generator, **options)
    elif args.gif:
        states = list(pipe.sample_iter(prompts, generator, **options))
        frames = [make_grid(pipe.decode_partial(s), nrow=nrow) for s in states]
        save_gif(frames, args.gif)
        images = pipe.decode(states[-1])
        log.info("wrote %s", args.gif)
    else:
        images = pipe(prompts, generator, **options)
    save_picture(make_grid(images, nrow=nrow, captions=prompts, scale=max(1, 128 // images[0].width)), args.out)
    log.info("wrote %s", args.out)


def eval_shapes_command(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="vqdiff eval-shapes",
        description="Score a text-to-image model on shapes prompts with the attribute metric.")
    parser.add_argument("--checkpoint", required=True, help="pipeline directory, run directory or checkpoint")
    parser.add_argument("--n", type=int, default=500, help="prompts per split")
    parser.add_argument("--splits", default="val,heldout", help="comma-separated: val, heldout")
    parser.add_argument("--max-objects", type=int, default=None, help="default: the model's training setting")
    parser.add_argument("--steps", default=None, help="e.g. 25; Gaussian models also 'ddim25'")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--truncation", type=float, default=None)
    parser.add_argument("--strategy", choices=SamplingStrategy.values(), default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-seed", type=int, default=1000,
                        help="which prompts (1000: those of docs/results.md); another set checks a choice is not tuned to them")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the transformer (see vqdiff sample)")
    parser.add_argument("--grid", default=None, help="PNG of the first 48 prompts and outputs, wrong objects outlined")
    parser.add_argument("--json", default=None, help="write the report as JSON")
    args = parser.parse_intermixed_args(argv)
    check_counts(n=args.n, batch_size=args.batch_size, max_objects=args.max_objects)
    check_sampling_options(args.guidance, args.truncation)
    steps = parse_steps(args.steps)
    import json
    import time
    import torch
    from .data.shapes import eval_prompts
    from .eval.shapes import evaluate
    from .eval.shapes_grid import make_grid
    from .pipeline import load_pipeline
    pipe = load_pipeline(args.checkpoint, device=args.device,
                         dtype=getattr(torch, args.dtype) if args.dtype else None)
    max_objects = args.max_objects or pipe.cfg.data.max_objects
    prompts = [c for split in args.splits.split(",") for c, _ in eval_prompts(split.strip(), args.n, args.prompt_seed,
                                                                             max_objects=max_objects)]
    options = dict(steps=steps, guidance_scale=args.guidance, truncation_rate=args.truncation,
                   strategy=args.strategy)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    started = time.perf_counter()
    images = pipe.generate(prompts, args.batch_size, generator, **options)
    seconds = time.perf_counter() - started
    report = evaluate(images, prompts)
    print(report.table())
    print(f"{len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} img/s), options "
          f"{ {k: getattr(v, 'value', v) for k, v in pipe.sampling_options(**options).items()} }")
    if args.grid:
        make_grid(images[:48], prompts[:48], report.scores[:48]).save(args.grid)
    result = {"report": report.to_dict(), "images_per_s": len(images) / seconds,
              "options": pipe.sampling_options(**options), "prompts": prompts}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def info_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff info", description="Parameter counts of a config's networks.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="VQ-Diffusion: codebook size K to count with (default: from the tokenizer)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from . import build
    cfg = load_config(args.config, args.overrides)
    for part, count in build.parameter_counts(cfg, args.num_classes).items():
        print(f"{part:<28} {count:>15,}")


def convert_to_diffusers_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="vqdiff convert to-diffusers",
                                     description="vqdiff pipeline directory -> diffusers VQDiffusionPipeline folder.")
    parser.add_argument("model", help="pipeline directory (save_pretrained), run directory or checkpoint")
    parser.add_argument("--out", required=True, help="the diffusers folder to write (replaced)")
    parser.add_argument("--ignore-padding-mask", action="store_true",
                        help="convert a transformer trained with the text padding masked (diffusers attends to it)")
    args = parser.parse_intermixed_args(argv)
    from .interop.diffusers import DiffusersConversionError, export_pipeline
    from .pipeline import TextToImagePipeline
    pipe = TextToImagePipeline.from_pretrained(args.model)
    try:
        out = export_pipeline(pipe.cfg, pipe.tokenizer, pipe.model.network, pipe.model.text_encoder, args.out,
                              ignore_padding_mask=args.ignore_padding_mask)
    except DiffusersConversionError as error:
        raise ConfigError(str(error)) from error
    log.info("wrote %s (load with diffusers.VQDiffusionPipeline.from_pretrained)", out)
    return out


def convert_from_diffusers_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="vqdiff convert from-diffusers",
                                     description="diffusers VQDiffusionPipeline folder -> vqdiff pipeline directory.")
    parser.add_argument("folder", help="a local VQDiffusionPipeline folder (model_index.json); nothing is downloaded")
    parser.add_argument("--out", required=True, help="the vqdiff pipeline directory to write (replaced)")
    args = parser.parse_intermixed_args(argv)
    from .interop.diffusers import DiffusersConversionError, import_pipeline
    from .models.conditioned import TextConditioned
    from .pipeline import TextToImagePipeline
    try:
        cfg, tokenizer, network, text_encoder = import_pipeline(args.folder)
    except DiffusersConversionError as error:
        raise ConfigError(str(error)) from error
    pipe = TextToImagePipeline.from_parts(cfg, tokenizer, TextConditioned(network, text_encoder))
    out = pipe.save_pretrained(args.out)
    log.info("wrote %s (vqdiff sample --model %s ...)", out, out)
    return out


def convert_official_command(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(prog="vqdiff convert official",
                                     description="released VQ-Diffusion checkpoint -> vqdiff pipeline directory.")
    parser.add_argument("checkpoint", help="a released file: coco_learnable.pth, ithq_learnable.pth, ...")
    parser.add_argument("--out", required=True, help="the vqdiff pipeline directory to write (replaced)")
    parser.add_argument("--codes-map", default=None,
                        help="COCO/CUB/CC: the codec's full-to-trimmed code table "
                             "(help_folder/statistics/taming_vqvae_2887.pt)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="the transformer and CLIP from the EMA copy (default, as the released inference) or the "
                             "trained weights")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle Python objects in the file (can run code from it): only for files you trust")
    args = parser.parse_intermixed_args(argv)
    from .interop.official import OfficialCheckpointError, official_pipeline
    try:
        pipe = official_pipeline(args.checkpoint, codes_map=args.codes_map, weights=args.weights,
                                 trust_pickle=args.trust_pickle)
    except OfficialCheckpointError as error:
        raise ConfigError(str(error)) from error
    network = pipe.model.network
    log.info("%s (%s weights): %d layers, %d classes, %s", args.checkpoint, args.weights, len(network.blocks),
             network.num_classes, "learned null text" if network.empty_text_embed is not None else "no null text")
    out = pipe.save_pretrained(args.out)
    log.info("wrote %s (vqdiff sample --model %s ...)", out, out)
    return out


# `vqdiff convert KIND ...`: each converter parses its own arguments.
CONVERTERS: dict = {"to-diffusers": convert_to_diffusers_command, "from-diffusers": convert_from_diffusers_command,
                    "official": convert_official_command}


def convert_command(argv: list[str]) -> None:
    if not argv or argv[0] not in CONVERTERS:
        raise ConfigError("usage: vqdiff convert {" + ",".join(CONVERTERS) + "} ... "
                          f"(got {argv[0] if argv else 'nothing'!r})")
    CONVERTERS[argv[0]](argv[1:])


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vqdiff serve",
                                     description="A local web page and HTTP API for a text-to-image model.")
    parser.add_argument("--model", required=True, help="run, checkpoint or pipeline folder (text-to-image)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast the transformer (see vqdiff sample)")
    parser.add_argument("--max-batch", type=int, default=8, help="most images one request may ask for")
    args = parser.parse_intermixed_args(argv)
    check_counts(max_batch=args.max_batch)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port: {args.port} is not a TCP port; allowed: 1 to 65535")
    try:
        import uvicorn
        from .serve.app import create_app
    except ImportError as error:
        raise UserError(f"vqdiff serve needs the serve extra (missing {error.name}): pip install 'vqdiff[serve]'")
    import torch
    from .pipeline import load_pipeline
    pipe = load_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    app = create_app(pipe, args.max_batch)
    if args.host not in LOOPBACK:
        log.warning("serving on %s: the server has no authentication; anyone who can reach it can use the model",
                    args.host)
    log.info("serving %s at http://%s:%d/ (Ctrl-C stops)", args.model, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


COMMANDS = {
    "train": train_command,
    "sample": sample_command,
    "sample-ddpm": sample_ddpm_command,
    "info": info_command,
    "eval-shapes": eval_shapes_command,
    "convert": convert_command,
    "serve": serve_command,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if arg != "--debug"), None)
    if command is None or command in ("-h", "--help") or command not in COMMANDS:
        print("usage: vqdiff {" + ",".join(COMMANDS) + "} ...\n"
              "  train        train a model from a YAML config (also: accelerate launch scripts/train_*.py)\n"
              "  sample       text-prompt sampling from a trained text-to-image model\n"
              "  sample-ddpm  sample a trained Gaussian DDPM into a PNG grid / GIF\n"
              "  info         parameter counts of a config's networks\n"
              "  eval-shapes  score a text-to-image model on shapes prompts (attribute accuracy, img/s)\n"
              "  convert      released checkpoints and diffusers folders <-> vqdiff pipeline folders\n"
              "  serve        a local web page and HTTP API for a text-to-image model")
        return 0 if command in ("-h", "--help") else 2
    setup_logging()
    # run_main takes --debug out of the arguments; the command is then the first one left
    return run_main(lambda args: COMMANDS[command](args[1:]), argv, prog=f"vqdiff {command}")


if __name__ == "__main__":
    sys.exit(main())
