"""Speed of the Gaussian DDPM path: training steps/s and sampling images/s for the CIFAR-10 UNet.

    python scripts/bench_ddpm.py [--device cuda] [--batch-sizes 1 64] [--iters 3] [--dtype bfloat16]

A training step is forward + backward of the full loss + AdamW. Sampling images/s is measured on a few
reverse steps and scaled to DDPM 1000 and DDIM 50 steps (every step costs the same network call).
Peak memory is CUDA's max allocated on a GPU, the process's peak RSS on a CPU.
"""

import argparse

import torch

from vqdiff.diffusion.gaussian import GaussianDiffusion
from vqdiff.diffusion.schedules import beta_schedule
from vqdiff.errors import script_main
from vqdiff.eval.bench import peak_memory_bytes, reset_peak_memory, seconds_per_call
from vqdiff.models.unet import UNet, unet_preset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = UNet(**unet_preset("ddpm_cifar10")).to(device)
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    print(f"CIFAR-10 UNet ({sum(p.numel() for p in model.parameters()):,} parameters) on {device}, {args.dtype}")
    print("| batch | train steps/s | DDPM 1000 img/s | DDIM 50 img/s | peak MiB |\n|---|---|---|---|---|")
    for batch in args.batch_sizes:
        x0 = torch.randn(batch, 3, 32, 32, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)

        def train_step():
            with autocast:
                loss = diffusion.training_losses(model, x0, t)["loss"].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        @torch.no_grad()
        def sample_step():
            with autocast:
                diffusion.p_sample(model, x0, t)

        reset_peak_memory(device)
        train_s = seconds_per_call(train_step, args.iters, device)
        step_s = seconds_per_call(sample_step, args.iters, device)
        print(f"| {batch} | {1 / train_s:.3g} | {batch / (1000 * step_s):.3g} | {batch / (50 * step_s):.3g} "
              f"| {peak_memory_bytes(device) / 2**20:.0f} |")


if __name__ == "__main__":
    script_main(main, "bench_ddpm.py")
