"""DiffusionTransformer throughput: forward and forward+backward tokens/s, peak memory, and what caching the
text keys/values saves over a sampling run.

    python scripts/bench_transformer.py                          # S and B presets, batch 1 and 8
    python scripts/bench_transformer.py --presets B --num-layers 4 --batch 1   # a cut-down B for CPUs
    python scripts/bench_transformer.py --dtype bfloat16 --batch 16            # GPU, autocast
    python scripts/bench_transformer.py --presets S --num-layers 4 --width 256 --num-heads 8 --batch 4
                                               # PERFORMANCE.md's "small" config

The training columns: forward+backward of the bare network + cross-entropy, and of the full diffusion loss.
Random weights and random text features [B, 77, 512]; K = 2887 codes, 32x32 tokens, T = 100.
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.errors import script_main
from vqdiff.eval.bench import peak_memory_bytes, reset_peak_memory, seconds_per_call
from vqdiff.models.transformer import TRANSFORMER_PRESETS, DiffusionTransformer
from vqdiff.options import Activation


def bench(args, preset, batch, device):
    config = dict(TRANSFORMER_PRESETS[preset], num_classes=2887, mlp_activation=args.activation)
    overrides = dict(num_layers=args.num_layers, width=args.width, num_heads=args.num_heads)
    config.update({k: v for k, v in overrides.items() if v})
    model = DiffusionTransformer(**config).to(device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 2888, (batch, 1024), device=device, generator=g)
    t = torch.randint(0, 100, (batch,), device=device, generator=g)
    text = F.normalize(torch.randn(batch, 77, 512, device=device, generator=g), dim=-1)
    target = torch.randint(0, 2887, (batch, 1024), device=device, generator=g)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, args.dtype)) if args.dtype != "float32"
                else contextlib.nullcontext())

    diffusion = MaskAndReplaceDiffusion(2887, 100)

    def train_step():  # the bare network + cross-entropy, PERFORMANCE.md's training anchor
        with autocast:
            loss = F.cross_entropy(model(x, t, text=text), target)
        loss.backward()

    def full_loss_step():  # q_sample + the VLB KL + auxiliary x0 loss of the mask-and-replace diffusion
        with autocast:
            loss = diffusion.training_losses(model, target, t, generator=g, text=text)["loss"].mean()
        loss.backward()

    with torch.inference_mode(), autocast:
        model.eval()
        cached = model.cache_text(text)
        reset_peak_memory(device)
        forward = seconds_per_call(lambda: model(x, t, text=text), args.repeats, device)
        forward_cached = seconds_per_call(lambda: model(x, t, **cached), args.repeats, device)
        cache_once = seconds_per_call(lambda: model.cache_text(text), args.repeats, device)
        forward_memory = peak_memory_bytes(device) / 2**30
    model.train()
    reset_peak_memory(device)
    backward = seconds_per_call(train_step, args.repeats, device)
    full_loss = seconds_per_call(full_loss_step, args.repeats, device)
    steps = args.sampling_steps
    saving = steps * forward - (cache_once + steps * forward_cached)
    tokens = batch * 1024
    print(f"{preset:>2} L{config['num_layers']:<3} W{config['width']:<5} batch {batch:<3} {args.dtype:<9} "
          f"fwd {tokens / forward:9.0f} tok/s ({forward * 1e3:7.1f} ms, cached {forward_cached * 1e3:7.1f} ms)  "
          f"fwd+bwd {tokens / backward:9.0f} tok/s ({backward * 1e3:7.1f} ms, full loss {full_loss * 1e3:7.1f} ms)  "
          f"peak fwd {forward_memory:5.2f} / train {peak_memory_bytes(device) / 2**30:5.2f} GiB  "
          f"K/V cache saves {saving:6.2f} s over {steps} steps ({saving / (steps * forward) * 100:4.1f}%)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["S", "B"], choices=sorted(TRANSFORMER_PRESETS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset depth (CPU runs)")
    parser.add_argument("--width", type=int, default=None, help="override the preset width")
    parser.add_argument("--num-heads", type=int, default=None, help="override the preset head count")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--activation", default="quick_gelu", choices=Activation.values())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {name}, torch {torch.__version__}; peak memory: "
          f"{'max allocated' if device.type == 'cuda' else 'process peak RSS'}")
    for preset in args.presets:
        for batch in args.batch:
            bench(args, preset, batch, device)


if __name__ == "__main__":
    script_main(main, "bench_transformer.py")
