"""Sampling speed of VQ-Diffusion at PERFORMANCE.md's fixed configs (random weights, text a fixed random
[B, 77, 512] tensor, no CLIP and no VQ decoder in the timing).

    python scripts/bench_sample.py [--configs tiny small] [--steps 10] [--device cuda --dtype bfloat16]

Per config: ms per sampling step (network + diffusion math), the network alone, their difference (the
math), a step with truncation r = 0.86, a guided step (one 2B call), and images/s for a 10-step run.
"""

import argparse
import time

import torch

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.models.transformer import DiffusionTransformer

CONFIGS = {  # layers, width, heads, grid side, K (without [MASK]), batch
    "tiny": (4, 256, 8, 16, 1024, 4),
    "small": (4, 256, 8, 32, 2887, 4),
    "B": (19, 1024, 16, 32, 2887, 16),
}


def clock(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(name: str, steps: int, device, dtype) -> str:
    layers, width, heads, side, K, batch = CONFIGS[name]
    torch.manual_seed(0)
    model = DiffusionTransformer(K, width, layers, heads, grid_size=(side, side), text_dim=512,
                                 null_text_embedding=True).to(device).eval()
    diffusion = MaskAndReplaceDiffusion(K, 100)
    text = torch.randn(batch, 77, 512, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    N = side * side
    with torch.no_grad(), autocast:
        cond = model.cache_text(text)
        null = model.cache_text(*model.null_text(batch))
        x = torch.randint(0, K + 1, (batch, N), device=device)
        t = torch.full((batch,), 50, device=device)

        def run(**options):
            diffusion.sample(model, batch, N, cond=cond, steps=steps, progress=False, device=device, **options)

        run()  # warm-up
        net = clock(lambda: [model(x, t, **cond) for _ in range(steps)], device) / steps
        step = clock(run, device) / steps
        truncated = clock(lambda: run(truncation_rate=0.86), device) / steps
        guided = clock(lambda: run(truncation_rate=0.86, guidance_scale=3.0, null_cond=null), device) / steps
    math = step - net
    return (f"| {name} | {batch} | {step * 1e3:.0f} | {net * 1e3:.0f} | {math * 1e3:.0f} ({100 * math / step:.0f}%) "
            f"| {truncated * 1e3:.0f} | {guided * 1e3:.0f} | {batch / (10 * truncated):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10, help="sampling steps timed per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| config | batch | step ms | network ms | math ms | truncation r=0.86 ms/step | guided ms/step "
          "| 10-step img/s |\n|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        print(bench(name, args.steps, device, args.dtype), flush=True)


if __name__ == "__main__":
    main()
