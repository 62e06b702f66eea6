"""Sampling speed of VQ-Diffusion at PERFORMANCE.md's fixed configs (random weights, text a fixed random
[B, 77, 512] tensor, no CLIP and no VQ decoder in the timing).

    python scripts/bench_sample.py                                   # CPU: tiny and small, batch 4
    python scripts/bench_sample.py --configs B --dtype bfloat16 --runs 25 100            # GPU, B, batch 16
    python scripts/bench_sample.py --configs shapes S256 --batch 1 8 32 --runs 25 50 100
    python scripts/bench_sample.py --configs small --threads 2 --against diffusers   # beside diffusers, same run
    python scripts/bench_sample.py --checkpoint runs/shapes --against diffusers      # a trained model's weights

Per config and batch: ms per sampling step (network + diffusion math), the network alone, the math alone
(the same sampling run on logits computed once beforehand) and its share of the step, a step with truncation
r = 0.86, a guided step (scale 3, r = 0.86, one 2B call), and images/s of whole ancestral runs (no
truncation, no guidance, as PERFORMANCE.md's anchors) at each of `--runs` step counts, with the peak memory
(CUDA max allocated; the process's peak RSS on a CPU). `--dtype bfloat16` runs under autocast with float32
weights (as PERFORMANCE.md's anchors), `--dtype bf16-weights` casts the network.

`--against diffusers` instead times diffusers' Transformer2DModel + VQDiffusionScheduler (+ its pipeline's
truncate) on the same weights, text and timesteps in the same process, interleaved, and prints both sides' ms per
step (network, step, truncated, guided), images/s of the `--steps`-step runs, and their ratios (see
vqdiff.eval.side_by_side); `--dtype` and `--compile` apply to both networks. On a GPU (PERFORMANCE.md's anchor):

    python scripts/bench_sample.py --configs B --dtype bf16-weights --compile --steps 100 --against diffusers

`--checkpoint RUN` takes the network, schedule and prompts (its preview prompts through its text encoder) of any
run, checkpoint or pipeline folder instead of a random config.
"""

import argparse

import torch

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.errors import script_main
from vqdiff.eval.bench import autocast, peak_memory_bytes, prepared, seconds_per_call
from vqdiff.eval.side_by_side import MARKDOWN_HEADER, calls, compare_with_diffusers
from vqdiff.models.transformer import TRANSFORMER_PRESETS, DiffusionTransformer

CONFIGS = {  # layers, width, heads, grid side, K (without [MASK]), default batch
    "tiny": (4, 256, 8, 16, 1024, 4),
    "small": (4, 256, 8, 32, 2887, 4),
    "B": (19, 1024, 16, 32, 2887, 16),
    "shapes": (4, 256, 8, 8, 670, 8),  # configs/shapes.yaml's network (K: vqvae_shapes32 kept 670-707 codes)
    "S256": (*TRANSFORMER_PRESETS["S"].values(), 32, 2887, 8),  # the S preset at 256 px
}


def bench(label: str, setup, steps: int, runs: list[int], device, dtype: str, compile_mode: str | None) -> str:
    """One table row for the network, diffusion, text and null text of `setup` (random_setup, checkpoint_setup)."""
    model, diffusion, text, null_text = setup
    model = prepared(model, dtype, compile_mode)
    weight_dtype = next(model.parameters()).dtype
    batch, K, N = text.shape[0], diffusion.num_classes, model.num_tokens
    with torch.no_grad(), autocast(device, dtype):
        cond = model.cache_text(text.to(weight_dtype))
        null = model.cache_text(null_text.to(weight_dtype))
        x = torch.randint(0, K + 1, (batch, N), device=device)
        t = torch.full((batch,), diffusion.num_timesteps // 2, device=device)

        def run(n=steps, network=model, **options):
            diffusion.sample(network, batch, N, cond=cond, steps=n, progress=False, device=device, **options)

        logits = model(x, t, **cond).clone()  # a CUDA-graph output is overwritten by the next replay

        def no_network(*args, **kwargs):  # a step without the network's cost: the diffusion math alone
            return logits

        run()  # warm-up (and compilation)
        run(truncation_rate=0.86, guidance_scale=3.0, null_cond=null)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        net = seconds_per_call(lambda: calls(lambda: model(x, t, **cond), steps), 1, device, warmup=0) / steps
        step = seconds_per_call(run, 1, device, warmup=0) / steps
        math = seconds_per_call(lambda: run(network=no_network), 1, device, warmup=0) / steps
        truncated = seconds_per_call(lambda: run(truncation_rate=0.86), 1, device, warmup=0) / steps
        guided = seconds_per_call(lambda: run(truncation_rate=0.86, guidance_scale=3.0, null_cond=null), 1, device,
                                  warmup=0) / steps
        rates = [batch / seconds_per_call(lambda: run(n), 1, device, warmup=0) for n in runs]
    return (f"| {label} | {batch} | {step * 1e3:.1f} | {net * 1e3:.1f} | {math * 1e3:.1f} ({100 * math / step:.0f}%) "
            f"| {truncated * 1e3:.1f} | {guided * 1e3:.1f} | " + " | ".join(f"{r:.2f}" for r in rates)
            + f" | {peak_memory_bytes(device) / 2**30:.2f} |")


def random_setup(name: str, batch: int, device):
    """(network, diffusion, text [B, 77, 512], null text) of a config with random weights."""
    layers, width, heads, side, K, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = DiffusionTransformer(K, width, layers, heads, grid_size=(side, side), text_dim=512,
                                 null_text_embedding=True, mask_text_padding=False).to(device).eval()
    return model, MaskAndReplaceDiffusion(K, 100), torch.randn(batch, 77, 512, device=device), model.null_text(batch)[0]


def checkpoint_setup(path: str, batch: int, device):
    """(network, diffusion, text, null text) of a trained model: its preview prompts through its text encoder."""
    from vqdiff.pipeline import TextToImagePipeline
    from vqdiff.train.previews import preview_prompts
    pipe = TextToImagePipeline.from_pretrained(path, device)
    prompts = (preview_prompts(pipe.cfg) * batch)[:batch]
    with torch.no_grad():
        text = pipe.model.encode_text(prompts)[0]
        null = pipe.model.encode_text([""] * batch)[0] if pipe.model.network.empty_text_embed is None else \
            pipe.model.network.null_text(batch)[0]
    return pipe.model.network.eval(), pipe.diffusion, text.float(), null.float().contiguous()


def against_diffusers(label: str, setup, args, device) -> tuple[str, list[str]]:
    """Side-by-side rows of `setup`'s network beside its conversion to diffusers' Transformer2DModel."""
    from vqdiff.interop.diffusers import transformer_to_diffusers
    network = setup[0]
    transformer = transformer_to_diffusers(network, ignore_padding_mask=True).to(device)
    return compare_with_diffusers(label, setup, transformer, args.steps, args.repeats, device, args.dtype,
                                  args.compile)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    parser.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps timed per per-step measurement")
    parser.add_argument("--runs", nargs="*", type=int, default=[10], help="step counts of the timed whole runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "bf16-weights"), default="float32")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the network's forward (MODE: default, reduce-overhead = CUDA graphs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--against", choices=("diffusers",), default=None,
                        help="time diffusers' sampler beside ours instead (same weights, inputs, --dtype, --compile)")
    parser.add_argument("--checkpoint", default=None, help="a run, checkpoint or pipeline folder instead of --configs")
    parser.add_argument("--repeats", type=int, default=3, help="with --against: interleaved rounds (medians)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if args.against:
        compare(args, device, where)
        return
    print(f"# {where}, {args.dtype}{f', compiled ({args.compile})' if args.compile else ''}, torch {torch.__version__}")
    print("| config | batch | step ms | network ms | math ms | truncation r=0.86 ms/step | guided ms/step | "
          + " | ".join(f"{n}-step img/s" for n in args.runs) + " | peak GiB |")
    print("|---" * (8 + len(args.runs)) + "|")
    for label, setup, batch in setups(args, device):
        print(bench(label, setup(batch), args.steps, args.runs, device, args.dtype, args.compile), flush=True)


def setups(args, device) -> list:
    """(label, setup(batch), batch) per row: the checkpoint's network at each batch, or each config's."""
    if args.checkpoint:
        return [(f"checkpoint {args.checkpoint}", lambda b: checkpoint_setup(args.checkpoint, b, device), b)
                for b in args.batch or [4]]
    return [(name, lambda b, name=name: random_setup(name, b, device), b)
            for name in args.configs for b in args.batch or [CONFIGS[name][-1]]]


def compare(args, device, where: str) -> None:
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed (pip install -e '.[dev]'): skipping the side-by-side comparison")
        return
    print(f"# {where}, {args.dtype}{f', compiled ({args.compile})' if args.compile else ''}, torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}")
    rows = []
    for label, setup, batch in setups(args, device):
        note, table = against_diffusers(label, setup(batch), args, device)
        print(note, flush=True)
        rows += table
    print("\n".join(MARKDOWN_HEADER + rows))


if __name__ == "__main__":
    script_main(main, "bench_sample.py")
