"""Time and peak memory of the mask-and-replace diffusion math alone, per sampling step and per training loss.

    python scripts/bench_discrete.py                                  # K=4096, N=1024, B=8, T=100
    python scripts/bench_discrete.py --num-classes 2887 --batch 4     # PERFORMANCE.md's "small" sizes
    python scripts/bench_discrete.py --device cuda --batch 16

The network is a stand-in whose own time is subtracted: fixed logits [B, K, N], N(0, 1) times a per-token
scale uniform in [0.5, 8] (flat to confident tokens), plus +20 on the token already in x_t, as a trained
network is sure of unmasked tokens. Each case runs in a fresh process; the peak is the memory above the
inputs and the network's output buffer (CPU: peak RSS, CUDA: peak allocated).
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vqdiff.diffusion.discrete import MaskAndReplaceDiffusion
from vqdiff.errors import script_main

SAMPLING = {  # name: sample() options
    "ancestral": dict(),
    "ancestral r=0.86": dict(truncation_rate=0.86),
    "purity r=0.86": dict(strategy="purity", truncation_rate=0.86),
    "guided s=5 r=0.86": dict(guidance_scale=5.0, truncation_rate=0.86, null_cond={}),
}
TRAINING = ("training loss (fwd+bwd)", "cross-entropy only (fwd+bwd)")


def clock(device):
    """(wall, CPU) seconds, after the device is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.tensor([time.perf_counter(), time.process_time()], dtype=torch.float64)


class FixedNetwork:
    """Writes the fixed logits into one buffer, sure of the tokens already in x_t; counts its own time."""

    def __init__(self, logits):
        self.logits, self.out, self.seconds = logits, logits.clone(), torch.zeros(2, dtype=torch.float64)

    def __call__(self, xt, t, **cond):
        start = clock(xt.device)
        out = self.out[: xt.shape[0]]
        out.copy_(self.logits[: xt.shape[0]])
        content = (xt < out.shape[1]).unsqueeze(1).float()
        out.scatter_add_(1, xt.clamp(max=out.shape[1] - 1).unsqueeze(1), 20.0 * content)
        self.seconds += clock(xt.device) - start
        return out


def memory_mark(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_above(mark, device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - mark


def run_case(args, name):
    """(wall, CPU) seconds per sampling step or per loss evaluation, and the peak bytes."""
    device = torch.device(args.device)
    K, B, N = args.num_classes, args.batch, args.tokens
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.empty(2 * B, K, N, device=device).normal_(generator=generator)
    logits.mul_(torch.empty(2 * B, 1, N, device=device).uniform_(0.5, 8.0, generator=generator))
    diffusion = MaskAndReplaceDiffusion(K, args.timesteps)
    if name in SAMPLING:
        network = FixedNetwork(logits)
        mark, start = memory_mark(device), clock(device)
        diffusion.sample(network, B, N, steps=args.steps, generator=generator, progress=False, device=device,
                         **SAMPLING[name])
        seconds = (clock(device) - start - network.seconds) / (args.steps or args.timesteps)
        return seconds, peak_above(mark, device)
    x0 = torch.randint(K, (B, N), device=device, generator=generator)
    t = torch.randint(args.timesteps, (B,), device=device, generator=generator)
    leaf = logits[:B].clone().requires_grad_()

    def step():
        if name.startswith("training"):
            diffusion.training_losses(lambda xt, tt: leaf, x0, t, generator)["loss"].mean().backward()
        else:
            F.cross_entropy(leaf, x0).backward()

    step()
    mark, start = memory_mark(device), clock(device)
    for _ in range(args.repeats):
        step()
    return (clock(device) - start) / args.repeats, peak_above(mark, device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timesteps", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: every one)")
    parser.add_argument("--repeats", type=int, default=3, help="training-loss evaluations to average")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        seconds, peak = run_case(args, args.case)
        print(json.dumps({"ms": 1000 * float(seconds[0]), "cpu_ms": 1000 * float(seconds[1]), "peak": peak}))
        return
    print(f"K={args.num_classes}(+1) N={args.tokens} B={args.batch} T={args.timesteps} steps={args.steps or 'T'} "
          f"device={args.device} threads={args.threads or torch.get_num_threads()} torch={torch.__version__}")
    print("| case | ms per step / per loss | CPU ms (all threads) | peak MiB above inputs |\n|---|---|---|---|")
    for name in (*SAMPLING, *TRAINING):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", name], check=True,
                             capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(f"| {name} | {result['ms']:.1f} | {result['cpu_ms']:.1f} | {result['peak'] / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    script_main(main, "bench_discrete.py")
