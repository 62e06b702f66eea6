"""Samplers of `MaskAndReplaceDiffusion`: ancestral (every step or exact skip steps), purity, classifier-free
guidance, truncation and inpainting.

A step needs little of p(x0 | x_t): at tokens not masked in x_t its value p(x0 = x_t), which sets their
posterior weights, and whole rows only at the tokens then drawn from the network (a few per step, every
token at the last). `X0Distribution` gives both without building the guided, tempered, truncated
[B, K, N] distribution; tokens are drawn by inverse CDF. Work and memory stay O(B K N), no per-token loops.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import SamplingStrategy
from .guidance import guided_call
from .losses import shifted_exp, stable_softmax
from .truncation import Workspace, keep_at_or_above, threshold_and_mass, truncate


DENSE_SHARE = 0.5  # on CPU, truncate every token at once when a step asks for at least this share of them


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample VQ-Diffusion: the VQ-Diffusion keys of the config's `sample:` section, checked on creation.

    steps: network calls (None: every step), evenly strided, each an exact skip step q(x_s | x_t, x0).
    truncation_rate: keep the smallest set of classes holding that much of p(x0 | x_t) per token.
    temperature: divides the logits. guidance_scale != 1: classifier-free guidance (needs null_cond).
    strategy: ancestral, or purity (reveal the purest masked tokens first, Tang et al. 2022)."""
    steps: int | None = None
    truncation_rate: float = 1.0
    temperature: float = 1.0
    guidance_scale: float = 1.0
    strategy: SamplingStrategy = SamplingStrategy.ANCESTRAL

    def __post_init__(self):
        object.__setattr__(self, "strategy", SamplingStrategy(self.strategy))
        if not 0.0 < self.truncation_rate <= 1.0:
            raise ValueError(f"truncation_rate must lie in (0, 1], got {self.truncation_rate}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


def sampling_timesteps(num_timesteps: int, steps: int | None = None) -> list[int]:
    """The times T-1 = t_0 > ... > t_{S-1} >= 0 of S network calls, evenly strided (S = T: every step)."""
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return [i * num_timesteps // steps - 1 for i in range(steps, 0, -1)]


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One class per row of `[R, K]` non-negative weights, by inverse CDF (a tenth of multinomial's cost on CPU)."""
    cdf = probs.cumsum(dim=1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    # strictly below the total, so the class found always has positive weight
    target = torch.minimum(u * total, total * (1 - 2.0 ** -23))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


class X0Distribution:
    """p(x0 | x_t) of one step from the network's logits `[B, K, N]`: guidance on log-probabilities
    (Tang et al. 2022, eq. 10), then temperature, then truncation, evaluated only where asked.

    log_softmax(log_softmax(n) + s (log_softmax(c) - log_softmax(n))) = log_softmax(n + s (c - n)): the
    per-token normalisers cancel, so guidance is one lerp of the raw logits. Only the tokens asked for are
    read: their log-normaliser and largest probability (purity), and whole rows for the tokens that are
    drawn or that truncation cannot settle from p(x0 = x_t) alone. On CPU, once truncation asks for at least
    DENSE_SHARE of the tokens, every token is truncated in one cache-sized pass (`_truncation_table`).
    """

    def __init__(self, cond_logits: torch.Tensor, null_logits: torch.Tensor | None, guidance_scale: float,
                 temperature: float, truncation_rate: float):
        self.cond_logits, self.null_logits = cond_logits, null_logits
        self.guidance_scale, self.inverse_temperature = guidance_scale, 1.0 / temperature
        self.truncation_rate = truncation_rate
        self._table = None  # (probabilities per batch row [N, K], threshold [B, N], kept mass [B, N]), once built

    def _scaled(self, cond: torch.Tensor, null: torch.Tensor | None) -> torch.Tensor:
        logits = cond.float() if null is None else torch.lerp(null.float(), cond.float(), self.guidance_scale)
        return logits if self.inverse_temperature == 1.0 else logits * self.inverse_temperature

    def scaled(self) -> torch.Tensor:
        """The guided, tempered logits `[B, K, N]` of every token (float32, before truncation)."""
        return self._scaled(self.cond_logits, self.null_logits)

    def _statistics(self, rows: torch.Tensor):
        """Log-normaliser and largest probability `[R]` at ascending flat token indices `rows` (b * N + n):
        from the columns of those tokens when they are few, else from one pass over everything."""
        batch_size, _, num_tokens = self.cond_logits.shape
        if not _columnwise(self.cond_logits) or 4 * rows.shape[0] >= 3 * batch_size * num_tokens:
            normalizer, purity = self._all_statistics()
            return normalizer.view(-1)[rows], purity.view(-1)[rows]
        normalizer, purity = torch.empty(rows.shape[0]), torch.empty(rows.shape[0])
        for b, where, token in _per_batch(rows, batch_size, num_tokens):
            null = None if self.null_logits is None else self.null_logits[b].index_select(1, token)
            columns = self._scaled(self.cond_logits[b].index_select(1, token), null)  # [K, R_b], a copy
            exps, top = shifted_exp(columns, dim=0, inplace=True)
            total = exps.sum(dim=0)  # the largest class has exp(0) = 1
            normalizer[where], purity[where] = top.squeeze(0) + total.log(), total.reciprocal()
        return normalizer, purity

    def _all_statistics(self):
        """Log-normaliser and largest probability `[B, N]` of every token, a few batch rows at a time."""
        normalizers, purities = [], []
        for rows in _batch_chunks(self.cond_logits):
            null = None if self.null_logits is None else self.null_logits[rows]
            exps, top = shifted_exp(self._scaled(self.cond_logits[rows], null), dim=1)  # [b, K, N]
            total = exps.sum(dim=1)
            normalizers.append(top.squeeze(1) + total.log())
            purities.append(total.reciprocal())
        return torch.cat(normalizers), torch.cat(purities)

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Probabilities `[R, K]` at ascending flat token indices `rows`."""
        null = None if self.null_logits is None else _gather_rows(self.null_logits, rows)
        probs, _ = stable_softmax(self._scaled(_gather_rows(self.cond_logits, rows), null), dim=1, inplace=True)
        return truncate(probs, self.truncation_rate)

    def prob_at(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """p(x0 = classes | x_t) `[R]` at ascending flat token indices `rows`."""
        num_tokens = self.cond_logits.shape[2]
        if self._dense(rows):
            probs, threshold, kept = self._table
            p = torch.empty(rows.shape[0])
            for b, where, token in _per_batch(rows, len(probs), num_tokens):
                p[where] = probs[b][token, classes[where]]
            return torch.where(p >= threshold.view(-1)[rows], p / kept.view(-1)[rows], 0.0).float()
        batch, token = rows // num_tokens, rows % num_tokens
        null = None if self.null_logits is None else self.null_logits[batch, classes, token]
        logit = self._scaled(self.cond_logits[batch, classes, token], null)
        p = torch.exp(logit - self._statistics(rows)[0])
        if self.truncation_rate >= 1.0:
            return p
        # truncation keeps a class alone that reaches rate and holds more than 1/2; other rows need their full
        # distribution
        alone = _alone(p, self.truncation_rate)
        p = torch.where(alone, 1.0, p)
        unsettled = (~alone).nonzero().squeeze(1)
        for block in self._blocks(unsettled):
            p[block] = self.rows(rows[block]).gather(1, classes[block].unsqueeze(1)).squeeze(1)
        return p

    def draw(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token `[R]` from p(x0 | x_t) at each of the ascending flat token indices `rows`."""
        drawn = torch.empty_like(rows)
        dense = self._dense(rows)
        for block in self._blocks(torch.arange(rows.shape[0], device=rows.device)):
            if dense:  # the table's rows, zero below their threshold (sample_rows needs no normalisation)
                probs, threshold, _ = self._table
                weights = torch.empty(block.shape[0], self.cond_logits.shape[1])
                for b, where, token in _per_batch(rows[block], len(probs), self.cond_logits.shape[2]):
                    weights[where] = probs[b].index_select(0, token)
                weights = keep_at_or_above(weights, threshold.view(-1)[rows[block]].unsqueeze(1))
            else:
                weights = self.rows(rows[block])
            drawn[block] = sample_rows(weights, generator)
        return drawn

    def _dense(self, rows: torch.Tensor) -> bool:
        """Whether to read truncated rows from the table of every token, building it if `rows` are enough."""
        batch_size, _, num_tokens = self.cond_logits.shape
        if (self._table is None and self.truncation_rate < 1.0 and _columnwise(self.cond_logits)
                and rows.shape[0] >= DENSE_SHARE * batch_size * num_tokens):
            self._table = self._truncation_table()
        return self._table is not None

    def _truncation_table(self):
        """Every token's p(x0 | x_t), a table `[N, K]` per batch row, with its truncation threshold and kept
        mass `[B, N]`: a cache-sized block of tokens at a time is transposed, scaled, normalised and selected
        while in cache, instead of a pass over all tokens per operation."""
        batch_size, num_classes, num_tokens = self.cond_logits.shape
        rate = self.truncation_rate
        workspace = Workspace(num_classes, num_tokens, self.cond_logits.device)
        # one [N, K] table per batch row: below glibc's mmap threshold, so the last step's memory is reused
        probs = [torch.empty(num_tokens, num_classes) for _ in range(batch_size)]
        threshold = torch.empty(batch_size, num_tokens)
        kept = torch.empty(batch_size, num_tokens, dtype=torch.float64)
        for b in range(batch_size):
            for start in range(0, num_tokens, workspace.rows):
                columns = slice(start, start + workspace.rows)
                null = None if self.null_logits is None else self.null_logits[b, :, columns]
                scaled = self._scaled(self.cond_logits[b, :, columns], null)  # [K, width]
                if not scaled.is_contiguous():  # contiguous, the transposed copy below is a cache-blocked one
                    scaled = workspace.take("float32", scaled.shape).copy_(scaled)
                block = probs[b][columns].copy_(scaled.t())
                exps, _ = shifted_exp(block, dim=1, inplace=True)
                block.div_(exps.sum(dim=1, keepdim=True))
                top = block.amax(dim=1)
                if bool(_alone(top, rate).all()):  # each token's largest class alone reaches rate
                    threshold[b, columns], kept[b, columns] = top, top
                else:
                    low, mass = threshold_and_mass(block, rate, workspace)
                    threshold[b, columns], kept[b, columns] = low.squeeze(1), mass
        return probs, threshold, kept

    def _blocks(self, indices: torch.Tensor):
        """Consecutive pieces of `indices` whose rows take at most 16 MiB each on CPU (bounded temporaries
        that glibc recycles, see `_batch_chunks`); one piece elsewhere."""
        num_classes = self.cond_logits.shape[1]
        size = max(1, (1 << 22) // num_classes) if self.cond_logits.device.type == "cpu" else indices.shape[0]
        return indices.split(size) if indices.shape[0] else ()

    def purity(self, rows: torch.Tensor) -> torch.Tensor:
        """max_k p(x0 = k | x_t) `[R]` before truncation (the released code's purity score)."""
        return self._statistics(rows)[1]


def _alone(p: torch.Tensor, rate: float) -> torch.Tensor:
    """Whether a class of probability p is one that truncation keeps alone: p reaches rate (compared in float64,
    as the rule sums) and exceeds 1/2, so it is the largest class and no other ties with it."""
    return (p.double() >= rate) & (p > 0.5)


def _columnwise(logits: torch.Tensor) -> bool:
    """Whether to read class-major logits `[B, K, N]` a batch row at a time by index_select along N.

    On CPU, with long rows and a small batch, that reads whole cache lines and runs 2-5x faster than
    logits[b, :, n], which reads one float per line; elsewhere plain indexing is one kernel.
    """
    batch_size, _, num_tokens = logits.shape
    return logits.device.type == "cpu" and num_tokens >= 64 and batch_size <= 256


def _per_batch(rows: torch.Tensor, batch_size: int, num_tokens: int):
    """(b, slice of `rows`, token indices) for each batch row present in ascending flat `rows`."""
    counts = torch.bincount(rows // num_tokens, minlength=batch_size).tolist()
    start = 0
    for b, (count, token) in enumerate(zip(counts, torch.split(rows % num_tokens, counts))):
        if count:
            yield b, slice(start, start + count), token
        start += count


def _gather_rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `[R, K]` of class-major logits `[B, K, N]` at ascending flat token indices `rows`."""
    batch_size, num_classes, num_tokens = logits.shape
    if not _columnwise(logits):
        return logits[rows // num_tokens, :, rows % num_tokens]
    out = torch.empty(rows.shape[0], num_classes, dtype=logits.dtype)  # on CPU, as _columnwise says
    for b, where, token in _per_batch(rows, batch_size, num_tokens):
        out[where] = logits[b].index_select(1, token).t()
    return out


def _batch_chunks(x: torch.Tensor, max_elements: int = 1 << 22):
    """Batch slices of x. On CPU each holds at most `max_elements` (16 MiB of float32): glibc reuses freed
    blocks below its 32 MiB mmap threshold instead of mapping fresh zeroed pages, 2-3x faster per pass."""
    per_row = x[0].numel() if x.shape[0] else 1
    step = x.shape[0] if x.device.type != "cpu" else max(1, max_elements // per_row)
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def ancestral_step(diffusion, x0_dist: X0Distribution, xt: torch.Tensor, t: int, s: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_s ~ sum_x0 q(x_s | x_t, x0) p(x0 | x_t) for every token, -1 <= s < t (s = -1: x_0)."""
    K = diffusion.num_classes
    content = (xt != K).flatten().nonzero().squeeze(1)
    p_xt = torch.zeros(xt.numel(), device=xt.device)
    p_xt[content] = x0_dist.prob_at(content, xt.flatten()[content])
    out, from_model = _mixture_draw(diffusion, xt, t, s, p_xt.view(xt.shape), generator)
    drawn = from_model.flatten().nonzero().squeeze(1)
    out.view(-1)[drawn] = x0_dist.draw(drawn, generator)
    return out


def dense_ancestral_step(diffusion, x0_dist: X0Distribution, xt: torch.Tensor, t: int, s: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`ancestral_step` for GPUs, without truncation: p(x0 | x_t) of every token in one pass over
    [B, K, N] and a draw for every token by inverse CDF, used where the mixture picks the model. Nothing
    waits for the GPU, so the CPU queues the step while the network still runs; the sparse step's
    nonzero() calls would wait and then issue ~50 small kernels to an idle GPU."""
    K = diffusion.num_classes
    masked = xt == K
    exps, _ = shifted_exp(x0_dist.scaled(), dim=1)  # [B, K, N], largest class 1
    at_xt = exps.gather(1, xt.masked_fill(masked, 0).unsqueeze(1)).squeeze(1)
    cdf = exps.cumsum_(dim=1)
    total = cdf[:, -1]  # [B, N]
    p_xt = torch.where(masked, 0.0, at_xt / total)
    out, from_model = _mixture_draw(diffusion, xt, t, s, p_xt, generator)
    u = torch.rand(total.shape, generator=generator, device=xt.device, dtype=total.dtype)
    target = torch.minimum(u * total, total * (1 - 2.0 ** -23)).unsqueeze(1)  # strictly below the total
    x0 = (cdf <= target).sum(dim=1).clamp_(max=K - 1)  # searchsorted(cdf, target, right=True)
    return torch.where(from_model, x0, out)


def _mixture_draw(diffusion, xt: torch.Tensor, t: int, s: int, p_xt: torch.Tensor,
                  generator: torch.Generator | None):
    """Draw each token's component of the posterior mixture given p(x0 = x_t) `[B, N]`: returns x_s where the
    component is uniform, [MASK] or keep, and a mask `[B, N]` of the tokens to draw from the model."""
    K = diffusion.num_classes
    t_vec = torch.full((xt.shape[0],), t, dtype=torch.long, device=xt.device)
    masked = xt == K
    mix = diffusion.posterior_mixture(xt, t_vec, torch.full_like(t_vec, s), p_xt)
    # Regions of u in order: uniform, [MASK], model, keep. A masked token's model region runs to 1 and a
    # content token's keep region too, so rounding never leaves a [MASK] where it has weight 0.
    u = torch.rand(xt.shape, generator=generator, device=xt.device, dtype=torch.float64)
    end_uniform = mix.uniform
    end_mask = end_uniform + mix.mask
    end_model = torch.where(masked, 2.0, end_mask + mix.model)
    out = torch.where(u < end_uniform, torch.randint(K, xt.shape, generator=generator, device=xt.device), xt)
    out = out.masked_fill((u >= end_uniform) & (u < end_mask), K)
    return out, (u >= end_mask) & (u < end_model)


def purity_step(x0_dist: X0Distribution, xt: torch.Tensor, mask_id: int, keep_masked: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Reveal masked tokens until `keep_masked` `[B]` remain, those with the largest max_k p(x0 = k | x_t)
    first, each drawn from p(x0 | x_t); revealed tokens stay."""
    masked = xt == mask_id
    rows = masked.flatten().nonzero().squeeze(1)
    purity = torch.full((xt.numel(),), -1.0, device=xt.device)
    purity[rows] = x0_dist.purity(rows)
    order = purity.view(xt.shape).argsort(dim=1, descending=True)
    positions = torch.arange(xt.shape[1], device=xt.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # masked tokens rank before the others
    revealed = (rank < (masked.sum(dim=1) - keep_masked).unsqueeze(1)).flatten().nonzero().squeeze(1)
    out = xt.clone()
    out.view(-1)[revealed] = x0_dist.draw(revealed, generator)
    return out


@torch.no_grad()
def sample_iter(diffusion, model, batch_size: int, num_tokens: int, options: SamplingOptions,
                cond: dict | None = None, null_cond: dict | None = None,
                known_tokens: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None, progress: bool = False, device=None):
    """Yield the token map `[B, N]` after every step; the last one has no [MASK]. See
    `MaskAndReplaceDiffusion.sample` for the arguments. Ancestral sampling starts from the prior
    p(x_{T-1}), purity sampling from all [MASK]."""
    strategy, truncation_rate, guidance_scale = options.strategy, options.truncation_rate, options.guidance_scale
    if guidance_scale != 1.0 and null_cond is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs null_cond (the unconditional inputs)")
    cond = cond or {}
    device = _sample_device(device, known_tokens, cond, generator)
    known = _check_known(known_tokens, known_mask, batch_size, num_tokens, diffusion.num_classes, device)
    times = sampling_timesteps(diffusion.num_timesteps, options.steps)
    gamma_bar = diffusion.schedule.gamma_bar
    if strategy is SamplingStrategy.PURITY:
        if gamma_bar[times[0]] <= 0:
            raise ValueError("purity sampling starts from all [MASK]; this schedule never masks at t = T-1")
        xt = torch.full((batch_size, num_tokens), diffusion.mask_id, dtype=torch.long, device=device)
    else:
        xt = diffusion.sample_prior(batch_size, num_tokens, generator, device)
    if known is not None:
        xt = torch.where(known[1], known[0], xt)
    initial_masked = (xt == diffusion.mask_id).sum(dim=1)
    for t, s in tqdm(zip(times, times[1:] + [-1]), total=len(times), disable=not progress, desc="sampling"):
        t_vec = torch.full((batch_size,), t, dtype=torch.long, device=device)
        cond_logits, null_logits = guided_call(model, xt, t_vec, cond, null_cond, guidance_scale)
        for logits in (cond_logits, null_logits):
            check_logits(logits, batch_size, diffusion.num_classes, num_tokens)
        x0_dist = X0Distribution(cond_logits, null_logits, guidance_scale, options.temperature, truncation_rate)
        if strategy is SamplingStrategy.PURITY:
            # keep the masked share of the schedule: gamma_bar_s / gamma_bar_{T-1} of those masked at first
            share = float(gamma_bar[s] / gamma_bar[times[0]]) if s >= 0 else 0.0
            xt = purity_step(x0_dist, xt, diffusion.mask_id, torch.round(initial_masked * share).long(),
                             generator)
        else:
            step = dense_ancestral_step if _dense(device, truncation_rate) else ancestral_step
            xt = step(diffusion, x0_dist, xt, t, s, generator)
        if known is not None:
            xt = torch.where(known[1], known[0], xt)
        yield xt


def _dense(device: torch.device, truncation_rate: float) -> bool:
    """Whether ancestral steps read every token's row (`dense_ancestral_step`): on GPUs, without truncation."""
    return device.type != "cpu" and truncation_rate >= 1.0


def check_logits(logits: torch.Tensor | None, batch_size: int, num_classes: int, num_tokens: int) -> None:
    """A network's output must be logits [B, K, N] over the content classes."""
    if logits is not None and tuple(logits.shape) != (batch_size, num_classes, num_tokens):
        raise ValueError(f"the network must return logits [B, K, N] = {[batch_size, num_classes, num_tokens]} "
                         f"(no [MASK] logit), got {list(logits.shape)}")


def _check_known(known_tokens, known_mask, batch_size, num_tokens, num_classes, device):
    """(tokens, mask) on device for inpainting, or None."""
    if known_tokens is None and known_mask is None:
        return None
    if known_tokens is None or known_mask is None:
        raise ValueError("inpainting needs both known_tokens and known_mask")
    shape = (batch_size, num_tokens)
    if tuple(known_tokens.shape) != shape or tuple(known_mask.shape) != shape:
        raise ValueError(f"known_tokens and known_mask must have shape {list(shape)}, got "
                         f"{list(known_tokens.shape)} and {list(known_mask.shape)}")
    if known_mask.dtype != torch.bool:
        raise ValueError(f"known_mask must be a bool tensor, got {known_mask.dtype}")
    tokens = known_tokens[known_mask]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_classes):
        raise ValueError(f"known tokens must lie in [0, {num_classes - 1}] where known_mask is set")
    return known_tokens.to(device=device, dtype=torch.long), known_mask.to(device)


def _sample_device(device, known_tokens, cond: dict, generator) -> torch.device:
    if device is not None:
        return torch.device(device)
    if known_tokens is not None:
        return known_tokens.device
    tensors = [v for v in cond.values() if isinstance(v, torch.Tensor)]
    if tensors:
        return tensors[0].device
    return generator.device if generator is not None else torch.device("cpu")
