"""Seconds per training step of a text-to-image config, as `train_vq.py` runs it: the text tower, the
DiffusionTransformer, the mask-and-replace loss (VLB KL + x0 cross-entropy), backward and AdamW.

    python scripts/bench_train.py                                   # configs/shapes.yaml, float32 and bf16
    python scripts/bench_train.py --config configs/shapes_tiny.yaml --repeats 5

Random token grids stand in for the token cache (K and the grid come from the config's tokenizer when it exists,
else --num-classes and the config's grid), captions are real shapes captions. Rows: precision (float32, or bfloat16
autocast over float32 weights: `train.mixed_precision`) x AdamW (per-parameter loop, or fused). The variants run in
turns, `--repeats` times, and the table gives the fastest turn (least disturbed by other load).
"""

import argparse
import contextlib

import torch

from vqdiff.build import build_discrete_diffusion, build_vq_model, token_grid
from vqdiff.config import load_config
from vqdiff.data.shapes import ShapesDataset
from vqdiff.errors import script_main
from vqdiff.eval.bench import seconds_per_call
from vqdiff.io.tokenizer import load_tokenizer


def model_size(cfg, num_classes):
    if cfg.tokenizer.path is not None:
        try:
            tokenizer = load_tokenizer(cfg.tokenizer.path)
        except FileNotFoundError:
            pass
        else:
            return tokenizer.num_embeddings, token_grid(cfg, tokenizer)
    return num_classes, token_grid(cfg)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--num-classes", type=int, default=512, help="K when the config's tokenizer is absent")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per turn (after 3 warm-up steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    num_classes, grid = model_size(cfg, args.num_classes)
    torch.manual_seed(0)
    model = build_vq_model(cfg, num_classes, grid)
    diffusion = build_discrete_diffusion(cfg, num_classes)
    batch = cfg.data.batch_size
    shapes = ShapesDataset(split="train", size=cfg.data.size, num_samples=batch, max_objects=cfg.data.max_objects)
    captions = [shapes.caption(i) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, num_classes, (batch, grid[0] * grid[1]), generator=g)

    def turn(bf16: bool, fused: bool) -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

        def step():
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
            with autocast:
                loss = diffusion.training_losses(model, x0, t, generator=g, captions=captions)["loss"].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return seconds_per_call(step, args.steps, warmup=3)

    variants = [(False, False), (False, True), (True, False), (True, True)]
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            times[v].append(turn(*v))
    params = sum(p.numel() for p in model.parameters())
    print(f"# {cfg.name}: batch {batch}, {grid[0]}x{grid[1]} tokens, K {num_classes}, {params / 1e6:.1f}M parameters; "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'precision':<10} {'AdamW':<6} {'s/step':>7} {'samples/s':>10} {'speed-up':>9}")
    base = min(times[variants[0]])
    for (bf16, fused), turns in times.items():
        best = min(turns)
        print(f"{'bf16' if bf16 else 'float32':<10} {'fused' if fused else 'loop':<6} {best:7.3f} "
              f"{batch / best:10.1f} {base / best:8.2f}x")


if __name__ == "__main__":
    script_main(main, "bench_train.py")
