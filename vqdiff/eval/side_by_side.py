"""Sampling speed of vqdiff beside diffusers' VQ-Diffusion in one process: the same network weights (diffusers'
Transformer2DModel converted from ours), the same text tensor and timesteps, each measurement of one side
followed by the same one of the other (A B A B ...), medians reported. Used by `scripts/bench_sample.py
--against diffusers`.

The diffusers side is `VQDiffusionPipeline.__call__`'s loop without the text encoder and the VQ decoder: one
Transformer2DModel call (2B rows with guidance, then the pipeline's log-space combination), the pipeline's
`truncate` (a full sort of every token's row), clamp, `VQDiffusionScheduler.step`. The pipeline calls
`truncate` at rate 1.0 too; here it is skipped there, so diffusers' untruncated step is not charged its sort.
"""

import statistics
import time
from collections.abc import Callable

import torch

from ..diffusion.discrete_sampling import sampling_timesteps
from .bench import autocast, prepared

GUIDANCE_SCALE, TRUNCATION_RATE = 3.0, 0.86


def clock(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(measurements: dict[str, Callable], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each measurement over `repeats` rounds; each round runs every measurement once, in order,
    so the two sides of a comparison run back to back and share the machine's drift."""
    times = {name: [] for name in measurements}
    for _ in range(repeats):
        for name, fn in measurements.items():
            times[name].append(clock(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


class DiffusersLoop:
    """diffusers' sampling loop on a Transformer2DModel, for text features `text` [B, L, D] and, for guidance,
    `null_text` [B, L, D]."""

    def __init__(self, transformer, num_classes: int, num_timesteps: int, text: torch.Tensor,
                 null_text: torch.Tensor | None):
        import diffusers
        self.transformer, self.num_classes, self.text, self.null_text = transformer, num_classes, text, null_text
        self.scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=num_classes + 1,
                                                        num_train_timesteps=num_timesteps)
        self.truncate = diffusers.VQDiffusionPipeline.truncate  # uses nothing of the pipeline object

    def network(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """log p(x0 | x_t) [B, K, N]."""
        return self.transformer(x, encoder_hidden_states=self.text, timestep=torch.tensor(t, device=x.device)).sample

    @torch.no_grad()
    def run(self, times: list[int], truncation_rate: float = 1.0, guidance_scale: float = 1.0,
            generator: torch.Generator | None = None) -> torch.Tensor:
        sample = torch.full((self.text.shape[0], self.transformer.num_latent_pixels), self.num_classes,
                            device=self.text.device)
        guided = guidance_scale > 1.0
        text = torch.cat([self.null_text, self.text]) if guided else self.text
        for t in torch.tensor(times, device=sample.device):  # 0-dim tensors, as the pipeline passes them
            out = self.transformer(torch.cat([sample] * 2) if guided else sample, encoder_hidden_states=text,
                                   timestep=t).sample
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
                out -= torch.logsumexp(out, dim=1, keepdim=True)
            if truncation_rate < 1.0:
                out = self.truncate(None, out, truncation_rate)
            sample = self.scheduler.step(out.clamp(-70), timestep=t, sample=sample, generator=generator).prev_sample
        return sample


def calls(fn: Callable, times: int) -> None:
    """Call fn() `times` times, each output dropped before the next call (as a sampling loop drops its logits)."""
    for _ in range(times):
        fn()


def step_measurements(sample: Callable, network: Callable, steps: int) -> dict[str, Callable]:
    """The four timed runs of one side: the network alone (`steps` calls), and sampling runs of `steps` steps
    plain, truncated, and guided and truncated; `sample(**options)` runs one, `network()` makes one call."""
    return {"network": lambda: calls(network, steps),
            "step": lambda: sample(),
            "truncated": lambda: sample(truncation_rate=TRUNCATION_RATE),
            "guided": lambda: sample(truncation_rate=TRUNCATION_RATE, guidance_scale=GUIDANCE_SCALE)}


def side_by_side(sides: dict[str, tuple[Callable, Callable]], steps: int, repeats: int,
                 device: torch.device) -> dict[str, dict[str, float]]:
    """ms per step of each side's measurements {side: {network, step, truncated, guided}}, interleaved."""
    measurements = {}
    for kind in ("network", "step", "truncated", "guided"):
        for side, (sample, network) in sides.items():
            measurements[side, kind] = step_measurements(sample, network, steps)[kind]
    for fn in measurements.values():  # warm-up
        fn()
    medians = interleaved_medians(measurements, repeats, device)
    return {side: {kind: 1e3 * medians[side, kind] / steps for kind in ("network", "step", "truncated", "guided")}
            for side in sides}


def markdown_rows(label: str, figures: dict[str, dict[str, float]], ours: str, theirs: str, batch: int,
                  steps: int) -> list[str]:
    """One row per side and one of their ratio: network, step, truncated and guided ms per step, what truncation
    adds, the guided / unguided (both truncated) ratio, and images/s of the whole `steps`-step runs of `batch`
    images, untruncated and truncated."""
    figures = {side: {**f, "images": 1e3 * batch / (steps * f["step"]),
                      "images truncated": 1e3 * batch / (steps * f["truncated"])} for side, f in figures.items()}
    rows = []
    for side, f in figures.items():
        rows.append(f"| {label} | {side} | {f['network']:.1f} | {f['step']:.1f} | {f['truncated']:.1f} | "
                    f"{f['guided']:.1f} | {f['truncated'] - f['step']:+.1f} | {f['guided'] / f['truncated']:.2f} | "
                    f"{f['images']:.2f} | {f['images truncated']:.2f} |")
    a, b = figures[ours], figures[theirs]
    rows.append(f"| {label} | {ours} / {theirs} | " + " | ".join(
        f"{a[k] / b[k]:.2f}x" for k in ("network", "step", "truncated", "guided")) + " | | | " + " | ".join(
        f"{a[k] / b[k]:.2f}x" for k in ("images", "images truncated")) + " |")
    return rows


MARKDOWN_HEADER = ["| config | impl | network ms | step ms | truncated step ms (r=0.86) | guided step ms (s=3, r=0.86) "
                   "| truncation adds ms | guided / truncated | img/s | img/s truncated |",
                   "|---|---|---|---|---|---|---|---|---|---|"]


def compare_with_diffusers(label: str, setup, transformer, steps: int, repeats: int, device: torch.device,
                           dtype: str = "float32", compile_mode: str | None = None) -> tuple[str, list[str]]:
    """A note and the markdown rows of vqdiff's sampler beside diffusers' on the same network: `setup` = (network,
    diffusion, text, null text) and `transformer` the network as a Transformer2DModel (interop.diffusers); the
    same text, timesteps and step counts, both networks at `dtype` (bench.prepared) and compiled with
    `compile_mode`. The two networks' agreement is measured in float32, before any cast."""
    network, diffusion, text, null_text = setup
    times = sampling_timesteps(diffusion.num_timesteps, steps)
    batch, num_tokens = text.shape[0], transformer.num_latent_pixels
    x = torch.randint(0, network.num_classes + 1, (batch, num_tokens), device=device)
    t = torch.full((batch,), times[len(times) // 2], device=device)

    def loop(text, null_text):
        return DiffusersLoop(transformer, network.num_classes, diffusion.num_timesteps, text, null_text)

    with torch.no_grad():
        difference = (network(x, t, text=text).log_softmax(1) - loop(text, null_text).network(x, int(t[0]))).abs().max()
    network, transformer = prepared(network, dtype, compile_mode), prepared(transformer, dtype, compile_mode)
    weight_dtype = next(network.parameters()).dtype
    text, null_text = text.to(weight_dtype), null_text.to(weight_dtype)
    theirs = loop(text, null_text)

    with torch.no_grad(), autocast(device, dtype):
        cond, null = network.cache_text(text), network.cache_text(null_text)

        def ours(**options):
            diffusion.sample(network, batch, num_tokens, cond=cond, null_cond=null, steps=steps, progress=False,
                             device=device, **options)

        figures = side_by_side({"vqdiff": (ours, lambda: network(x, t, **cond)),
                                "diffusers": (lambda **options: theirs.run(times, **options),
                                              lambda: theirs.network(x, int(t[0])))}, steps, repeats, device)
    shown = ", ".join(map(str, times)) if len(times) <= 12 else f"{times[0]}, {times[1]}, ..., {times[-1]}"
    note = (f"# {label}, batch {batch}: same weights (max |log p difference| {difference:.1e} in float32), {steps} "
            f"steps at t = {shown}, medians of {repeats} interleaved rounds")
    return note, markdown_rows(label, figures, "vqdiff", "diffusers", batch, steps)
