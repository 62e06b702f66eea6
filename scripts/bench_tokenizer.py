"""Encode and decode throughput (images/s) of the Gumbel VQ-VAE tokenizer, random weights.

    python scripts/bench_tokenizer.py                    # CPU: 64 px shapes config (batch 8), 256 px f8 (batch 2)
    python scripts/bench_tokenizer.py --device cuda      # GPU: float32 and bfloat16 autocast, larger batches
"""

import argparse
import contextlib
import time

import torch

from vqdiff.errors import script_main
from vqdiff.eval.bench import synchronize
from vqdiff.models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE

SHAPES_64 = dict(resolution=64, ch=64, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[16], z_channels=64,
                 embedding_dim=64, num_embeddings=1024)
CONFIGS = {
    "shapes 64px f4 (16x16 tokens)": (SHAPES_64, dict(cpu=8, cuda=64)),
    "Gumbel f8 256px (32x32 tokens)": (GUMBEL_F8_CONFIG, dict(cpu=2, cuda=16)),
}


def images_per_second(fn, batch: int, warmup: int, iters: int, device: torch.device):
    """(images/s over `iters` timed calls after `warmup` untimed ones, the last output)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    synchronize(device)
    return batch * iters / (time.perf_counter() - start), out


def bench(config: dict, batch: int, device: torch.device, bf16: bool, warmup: int, iters: int) -> tuple[float, float]:
    model = GumbelVQVAE.from_config({**GUMBEL_F8_CONFIG, **config}).to(device).eval()
    size = config["resolution"]
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        encode, tokens = images_per_second(lambda: model.encode(images), batch, warmup, iters, device)
        decode, _ = images_per_second(lambda: model.decode(tokens), batch, warmup, iters, device)
    return encode, decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: 2 on CPU, 20 on GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    iters = args.iters or (20 if on_gpu else 2)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"# tokenizer throughput on {name}, torch {torch.__version__}, random weights\n")
    print("| config | dtype | batch | encode img/s | decode img/s |")
    print("|---|---|---|---|---|")
    for label, (config, batches) in CONFIGS.items():
        batch = batches[device.type] if device.type in batches else batches["cpu"]
        for bf16 in ([False, True] if on_gpu else [False]):
            encode, decode = bench(config, batch, device, bf16, args.warmup, iters)
            dtype = "bf16 autocast" if bf16 else "float32"
            print(f"| {label} | {dtype} | {batch} | {encode:.2f} | {decode:.2f} |", flush=True)


if __name__ == "__main__":
    script_main(main, "bench_tokenizer.py")
