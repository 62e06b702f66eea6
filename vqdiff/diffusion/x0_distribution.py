"""p(x0 | x_t) of one sampling step from the network's logits, evaluated only where a step asks: the guided,
tempered, truncated distribution of VQ-Diffusion's samplers (`discrete_sampling`), and draws from it."""

import torch

from .losses import shifted_exp, stable_softmax
from .truncation import Workspace, keep_at_or_above, threshold_and_mass, truncate

DENSE_SHARE = 0.5  # on CPU, truncate every token at once when a step asks for at least this share of them


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
            weights = self._table_rows(rows[block]) if dense else self.rows(rows[block])
            drawn[block] = sample_rows(weights, generator)
        return drawn

    def _table_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The table's rows `[R, K]` at ascending flat token indices `rows`, zero below their threshold and not
        renormalised (sample_rows divides by the total)."""
        probs, threshold, _ = self._table
        weights = torch.empty(rows.shape[0], self.cond_logits.shape[1])
        for b, where, token in _per_batch(rows, len(probs), self.cond_logits.shape[2]):
            weights[where] = probs[b].index_select(0, token)
        return keep_at_or_above(weights, threshold.view(-1)[rows].unsqueeze(1))

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
                    scaled = workspace.view("float32", scaled.shape).copy_(scaled)
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
