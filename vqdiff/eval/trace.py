"""How a sampled Shapes image takes shape, step by step (scripts/trace_shapes.py).

VQ-Diffusion: after chosen sampling steps every still-masked token is filled with the network's most likely x0
(the guided logits the next step would use), and the token map is decoded and scored against its prompt. The first
row (before any step: every token masked, t = T-1) is what the caption alone makes the network predict; the last
row is the sample itself. A Gaussian DDPM: at chosen steps its (guided) prediction of x0 is decoded and scored; the
first step's prediction is made from pure noise and the caption. Accuracy that the first rows have and the last
lacks is lost while sampling; accuracy that none has was never learned.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..diffusion.discrete_sampling import sampling_timesteps
from ..diffusion.guidance import guided_call
from ..diffusion.x0_distribution import X0Distribution
from .shapes import evaluate

COLUMNS = ("colour", "shape", "position", "size", "image", "extra")


@dataclass
class SamplingTrace:
    """One row per recorded step: `step` (0-based, -1 before the first), the share of tokens revealed (VQ) or the
    noise step t the row's x0 prediction was made at (Gaussian: `revealed` is None), and the `all` group of
    `evaluate` (per-object attribute accuracy, per-image accuracy, share with extra objects)."""
    images: int
    steps: list[int]
    revealed: list[float] | None
    scores: list[dict[str, float]]
    t: list[int] | None = None

    def table(self) -> str:
        second = f"{'revealed %':>10s}" if self.revealed is not None else f"{'t':>10s}"
        lines = [f"{'step':>5s} {second}" + "".join(f"{c:>9s}" for c in COLUMNS)]
        marks = ([f"{100 * r:10.1f}" for r in self.revealed] if self.revealed is not None
                 else [f"{t:10d}" for t in self.t])
        for step, mark, score in zip(self.steps, marks, self.scores):
            label = "start" if step < 0 else str(step + 1)
            lines.append(f"{label:>5s} {mark}" + "".join(f"{100 * score[c]:9.1f}" for c in COLUMNS))
        return "\n".join(lines)


def record_steps(steps: int, rows: int = 8) -> list[int]:
    """About `rows` 0-based steps to record, evenly spread, the first and last always among them."""
    return sorted({round(i * (steps - 1) / max(1, rows - 1)) for i in range(rows)})


def recorded_steps(at: Sequence[int] | None, num_steps: int) -> list[int]:
    """The sorted 0-based steps to record (default `record_steps`), checked against the run's step count."""
    at = sorted(set(record_steps(num_steps) if at is None else at))
    if at and not 0 <= at[0] <= at[-1] < num_steps:
        raise ValueError(f"steps to record must lie in [0, {num_steps - 1}], got {at}")
    return at


def score_states(pipe, states: dict[int, list[torch.Tensor]], prompts: Sequence[str]) -> list[dict[str, float]]:
    """Per recorded row, its batches of states decoded and scored against `prompts` (the `all` group)."""
    scores = []
    for batches in states.values():
        group = evaluate(pipe.decode(torch.cat(batches)), list(prompts)).groups["all"]
        scores.append({c: group[c] for c in COLUMNS})
    return scores


def predicted_x0(dist: X0Distribution, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t with every [MASK] replaced by its most likely x0 (guidance applied; truncation and temperature do
    not move the argmax)."""
    return torch.where(xt == mask_id, dist.scaled().argmax(dim=1), xt)


@torch.no_grad()
def trace_sampling(pipe, prompts: Sequence[str], at: Sequence[int] | None = None, seed: int = 0,
                   batch_size: int = 50, progress: bool = True, **options) -> SamplingTrace:
    """Trace a TextToImagePipeline's sampling of `prompts` (options as for the pipeline call) after the 0-based
    steps `at` (default `record_steps`), plus the start."""
    opts = pipe.sampling_options(**options)
    diffusion, network = pipe.diffusion, pipe.model.network
    times = sampling_timesteps(diffusion.num_timesteps, opts["steps"])
    at = recorded_steps(at, len(times))
    rows = [-1] + at
    filled = {row: [] for row in rows}
    revealed = {row: 0.0 for row in rows}
    generator = torch.Generator(pipe.device).manual_seed(seed)
    num_tokens = pipe.grid[0] * pipe.grid[1]
    mask_id = diffusion.mask_id
    for i in tqdm(range(0, len(prompts), batch_size), desc="trace", disable=not progress):
        batch = list(prompts[i:i + batch_size])
        cond, null_cond = pipe.conditions(batch, opts["guidance_scale"])

        def predict(xt: torch.Tensor, t: int) -> torch.Tensor:
            t_vec = torch.full((len(batch),), t, dtype=torch.long, device=pipe.device)
            logits = guided_call(network, xt, t_vec, cond, null_cond, opts["guidance_scale"])
            dist = X0Distribution(*logits, opts["guidance_scale"], 1.0, 1.0)
            return predicted_x0(dist, xt, mask_id)

        start = torch.full((len(batch), num_tokens), mask_id, dtype=torch.long, device=pipe.device)
        filled[-1].append(predict(start, times[0]))
        for k, xt in enumerate(pipe.sample_iter(batch, generator, progress=False, **opts)):
            if k in filled:
                revealed[k] += float((xt != mask_id).float().sum())
                filled[k].append(xt if k + 1 == len(times) else predict(xt, times[k + 1]))
    total = len(prompts) * num_tokens
    return SamplingTrace(len(prompts), rows, [0.0] + [revealed[k] / total for k in at],
                         score_states(pipe, filled, prompts))


@torch.no_grad()
def trace_gaussian(pipe, prompts: Sequence[str], at: Sequence[int] | None = None, seed: int = 0,
                   batch_size: int = 50, progress: bool = True, **options) -> SamplingTrace:
    """Trace a GaussianTextToImagePipeline's sampling of `prompts`: its x0 prediction at the 0-based steps `at`
    (default `record_steps`), the last of them the sample itself."""
    opts = pipe.sampling_options(**options)
    num_steps = pipe.diffusion.respace(opts["steps"]).num_timesteps if opts["steps"] else pipe.diffusion.num_timesteps
    at = recorded_steps(at, num_steps)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    predicted, t = {k: [] for k in at}, {}
    for i in tqdm(range(0, len(prompts), batch_size), desc="trace", disable=not progress):
        states = pipe.sample_states(list(prompts[i:i + batch_size]), generator, progress=False, **opts)
        for k, state in enumerate(states):
            if k in predicted:
                predicted[k].append(state["sample"] if k == num_steps - 1 else state["pred_xstart"])
                t[k] = state["t"]
    return SamplingTrace(len(prompts), at, None, score_states(pipe, predicted, prompts), [t[k] for k in at])
