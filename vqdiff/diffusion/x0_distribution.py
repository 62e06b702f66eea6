"""p(x0 | x_t) of one sampling step from the network's logits, evaluated only where a step asks: the guided,
tempered, truncated distribution of VQ-Diffusion's samplers (`discrete_sampling`), and draws from it."""

import torch

from . import truncation
from .losses import shifted_exp
from .truncation import Crossings, Workspace, keep_at_or_above

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
    per-token normalisers cancel, so guidance is one lerp of the raw logits (null_logits None: cond_logits are
    already guided, or unguided). Only the tokens asked for are read: their log-normaliser and largest
    probability (purity), and whole rows for the tokens that are drawn or that truncation cannot settle from
    p(x0 = x_t) alone. The logits are read token-major, each token's K classes contiguous: a view of
    DiffusionTransformer's inference logits, a transposed copy of class-major ones. On CPU, once truncation asks
    for at least DENSE_SHARE of the tokens, every token is truncated at once (`_dense`).
    """

    def __init__(self, cond_logits: torch.Tensor, null_logits: torch.Tensor | None, guidance_scale: float,
                 temperature: float, truncation_rate: float):
        self.shape = cond_logits.shape
        self.cond = _token_rows(cond_logits)  # [B * N, K] float32, each row contiguous
        self.null = None if null_logits is None else _token_rows(null_logits)
        self.guidance_scale, self.inverse_temperature = guidance_scale, 1.0 / temperature
        self.truncation_rate = truncation_rate
        self._table = None  # (probabilities per batch row [N, K], threshold [B, N], kept mass [B, N]), once built

    def _scaled(self, cond: torch.Tensor, null: torch.Tensor | None, out: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Guided, tempered logits of matching pieces of cond and null, written into `out` (which may be cond
        itself; a new tensor if None)."""
        out = torch.empty(cond.shape, device=cond.device) if out is None else out
        if null is not None:
            torch.lerp(null, cond, self.guidance_scale, out=out)
        else:
            out.copy_(cond)
        return out if self.inverse_temperature == 1.0 else out.mul_(self.inverse_temperature)

    def scaled(self) -> torch.Tensor:
        """The guided, tempered logits `[B, K, N]` of every token (float32, before truncation; token-major; the
        logits themselves when there is nothing to do, so not to be written)."""
        nothing_to_do = self.null is None and self.inverse_temperature == 1.0
        logits = self.cond if nothing_to_do else self._scaled(self.cond, self.null)
        return logits.unflatten(0, (self.shape[0], self.shape[2])).transpose(1, 2)

    def _scaled_rows(self, rows: torch.Tensor | slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Guided, tempered logits `[R, K]` at flat token indices `rows` (b * N + n; a tensor or a slice), written
        into `out` (a new tensor if None)."""
        cond, null = self.cond, self.null
        if isinstance(rows, slice):
            return self._scaled(cond[rows], None if null is None else null[rows], out)
        out = cond.index_select(0, rows) if out is None else torch.index_select(cond, 0, rows, out=out)
        return self._scaled(out, None if null is None else null.index_select(0, rows), out)

    def _statistics(self, rows: torch.Tensor):
        """Log-normaliser and largest probability `[R]` at flat token indices `rows`: from those rows when they
        are few, else from one pass over every token."""
        num_rows = self.shape[0] * self.shape[2]
        every = 4 * rows.shape[0] >= 3 * num_rows
        count = num_rows if every else rows.shape[0]
        normalizer, purity = torch.empty(count, device=rows.device), torch.empty(count, device=rows.device)
        for piece in self._pieces(count):
            exps, top = shifted_exp(self._scaled_rows(piece if every else rows[piece]), dim=1, inplace=True)
            total = exps.sum(dim=1)  # the largest class has exp(0) = 1
            normalizer[piece], purity[piece] = top.squeeze(1) + total.log(), total.reciprocal()
        return (normalizer[rows], purity[rows]) if every else (normalizer, purity)

    def _distribution(self, rows: torch.Tensor | slice):
        """p(x0 | x_t) `[R, K]` at flat token indices `rows` (a tensor or a slice), before truncation, with each
        row's truncation threshold `[R]` and kept mass `[R]` (float64; both None without truncation). A cache-sized
        block of rows at a time is gathered, scaled, normalised and its crossing bucket found while in cache,
        instead of a pass over all rows per operation; the crossings resolve together."""
        count = rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]
        device, rate = self.cond.device, self.truncation_rate
        probs = torch.empty(count, self.shape[1], device=device)
        workspace = Workspace(self.shape[1], count, device)
        threshold, kept = torch.empty(count, device=device), torch.empty(count, dtype=torch.float64, device=device)
        crossings, crossing_rows = Crossings(), []
        for start in range(0, count, workspace.rows):
            part = slice(start, min(start + workspace.rows, count))
            where = slice(rows.start + part.start, rows.start + part.stop) if isinstance(rows, slice) else rows[part]
            block = self._scaled_rows(where, out=probs[part])
            exps, _ = shifted_exp(block, dim=1, inplace=True)
            top = exps.sum(dim=1, keepdim=True).reciprocal_()  # the largest class's exp is 1: its probability
            block.mul_(top)
            if rate >= 1.0:
                continue
            top = top.squeeze(1)
            if bool(_alone(top, rate).all()):  # each token's largest class alone reaches rate
                threshold[part], kept[part] = top, top
            else:
                crossings.add(block, rate, workspace)
                crossing_rows.append(torch.arange(part.start, part.stop, device=device))
        if rate >= 1.0:
            return probs, None, None
        if crossing_rows:
            where = torch.cat(crossing_rows)
            low, mass = crossings.resolve(rate)
            threshold[where], kept[where] = low.squeeze(1), mass
        return probs, threshold, kept

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Probabilities `[R, K]` at flat token indices `rows`, truncated and renormalised."""
        probs, threshold, kept = self._distribution(rows)
        if threshold is None:
            return probs
        return keep_at_or_above(probs, threshold.unsqueeze(1)).mul_(kept.reciprocal().float().unsqueeze(1))

    def prob_at(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """p(x0 = classes | x_t) `[R]` at ascending flat token indices `rows`."""
        if self._dense(rows):
            probs, threshold, kept = self._table
            p = torch.empty(rows.shape[0])
            for b, where, token in _per_batch(rows, len(probs), self.shape[2]):
                p[where] = probs[b][token, classes[where]]
            return _truncated(p, threshold.view(-1)[rows], kept.view(-1)[rows])
        null = None if self.null is None else self.null[rows, classes]
        p = torch.exp(self._scaled(self.cond[rows, classes], null) - self._statistics(rows)[0])
        if self.truncation_rate >= 1.0:
            return p
        # truncation keeps a class alone that reaches rate and holds more than 1/2; other rows need their full
        # distribution
        alone = _alone(p, self.truncation_rate)
        p = torch.where(alone, 1.0, p)
        unsettled = (~alone).nonzero().squeeze(1)
        for piece in self._pieces(unsettled.shape[0]):
            block = unsettled[piece]
            probs, threshold, kept = self._distribution(rows[block])
            p[block] = _truncated(probs.gather(1, classes[block].unsqueeze(1)).squeeze(1), threshold, kept)
        return p

    def draw(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token `[R]` from p(x0 | x_t) at each of the ascending flat token indices `rows`."""
        drawn = torch.empty_like(rows)
        dense = self._dense(rows)
        for piece in self._pieces(rows.shape[0]):
            if dense:
                weights = self._table_rows(rows[piece])
            else:  # zero below the threshold, not renormalised: sample_rows divides by the total
                weights, threshold, _ = self._distribution(rows[piece])
                if threshold is not None:
                    keep_at_or_above(weights, threshold.unsqueeze(1))
            drawn[piece] = sample_rows(weights, generator)
        return drawn

    def _table_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The table's rows `[R, K]` at ascending flat token indices `rows`, zero below their threshold and not
        renormalised (sample_rows divides by the total)."""
        probs, threshold, _ = self._table
        weights = torch.empty(rows.shape[0], self.shape[1])
        for b, where, token in _per_batch(rows, len(probs), self.shape[2]):
            weights[where] = probs[b].index_select(0, token)
        return keep_at_or_above(weights, threshold.view(-1)[rows].unsqueeze(1))

    def _dense(self, rows: torch.Tensor) -> bool:
        """Whether to read truncated rows from the table of every token, building it if `rows` are enough: one
        `_distribution` per batch row, `[N, K]` each (below glibc's mmap threshold, so the last step's memory is
        reused)."""
        batch_size, _, num_tokens = self.shape
        if (self._table is None and self.truncation_rate < 1.0 and truncation.in_cache_blocks(self.cond.device)
                and rows.shape[0] >= DENSE_SHARE * batch_size * num_tokens):
            tables = [self._distribution(slice(b * num_tokens, (b + 1) * num_tokens)) for b in range(batch_size)]
            probs, threshold, kept = zip(*tables)
            self._table = list(probs), torch.stack(threshold), torch.stack(kept)
        return self._table is not None

    def _pieces(self, count: int) -> list[slice]:
        """Consecutive slices of `count` rows taking at most 16 MiB of float32 each on CPU (bounded temporaries:
        glibc reuses freed blocks below its 32 MiB mmap threshold instead of mapping fresh zeroed pages, 2-3x
        faster per pass); one slice elsewhere."""
        size = max(1, (1 << 22) // self.shape[1]) if truncation.in_cache_blocks(self.cond.device) else max(count, 1)
        return [slice(i, i + size) for i in range(0, count, size)]

    def purity(self, rows: torch.Tensor) -> torch.Tensor:
        """max_k p(x0 = k | x_t) `[R]` before truncation (the released code's purity score)."""
        return self._statistics(rows)[1]


def _token_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits `[B, K, N]` as float32 rows `[B * N, K]`, each contiguous: a view of token-major float32 memory
    (rows may be padded, as DiffusionTransformer's are), else a copy."""
    rows = logits.transpose(1, 2).float()
    if rows.stride(2) != 1 or rows.stride(0) != rows.shape[1] * rows.stride(1):
        rows = rows.contiguous()
    return rows.reshape(-1, rows.shape[2])


def _truncated(p: torch.Tensor, threshold: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Truncated, renormalised probabilities from untruncated ones `p`, their rows' thresholds and kept masses."""
    return torch.where(p >= threshold, p / kept, 0.0).float()


def _alone(p: torch.Tensor, rate: float) -> torch.Tensor:
    """Whether a class of probability p is one that truncation keeps alone: p reaches rate (compared in float64,
    as the rule sums) and exceeds 1/2, so it is the largest class and no other ties with it."""
    return (p.double() >= rate) & (p > 0.5)


def _per_batch(rows: torch.Tensor, batch_size: int, num_tokens: int):
    """(b, slice of `rows`, token indices) for each batch row present in ascending flat `rows`."""
    counts = torch.bincount(rows // num_tokens, minlength=batch_size).tolist()
    start = 0
    for b, (count, token) in enumerate(zip(counts, torch.split(rows % num_tokens, counts))):
        if count:
            yield b, slice(start, start + count), token
        start += count
