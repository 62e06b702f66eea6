"""Top-p truncation (Gu et al. 2022, sec. 4.3): per row of probabilities, the smallest set of classes holding
`rate` of the mass.

The rule, shared by the sorted reference and the fast selection: sort a row in descending order and sum it in
float64; the threshold is the value of the first class at which the sum reaches `rate` (every class if it never
does); every class at or above the threshold is kept, so classes tied with the smallest kept one stay too. The
masses of float32 probabilities of at least 2^-29 are multiples of 2^-52, so while a row's sums stay below 2 they
are exact in float64 in any order: the fast selection, which adds the same classes in another order, finds the
same threshold.

The fast selection costs a few passes over each row instead of a sort (7-20x faster on a CPU at K = 2887): a
histogram of each row's mass over value buckets (the float's exponent and top mantissa bits), summed from the
top, gives the bucket where the sum reaches `rate`; only that bucket's few classes are then sorted. The histogram
runs one cache-sized block of rows at a time, so every temporary is a block-sized buffer reused by the next block;
`Crossings` keeps each block's few candidates and sorts those of every block at once.
"""

import torch

BUCKET_BITS = 6  # mantissa bits in a bucket's key: 64 buckets per power of two, a few dozen classes in one
CHUNK_ELEMENTS = 1 << 18  # rows per block on CPU: 2 MiB int64 / float64 temporaries (1.2-1.5x faster than 8 MiB)
BELOW_COLUMNS = 16  # histogram columns that share the classes below the buckets' range (a power of two)
EXACT_FLOOR = 2.0**-29  # float32 values from here up are multiples of 2^-52: their float64 sums are exact


def in_cache_blocks(device: torch.device) -> bool:
    """Whether work over many rows runs one cache-sized block at a time (on a CPU), or on all rows at once (on an
    accelerator, where one launch per operation over every row is what pays)."""
    return device.type == "cpu"


def truncate(probs: torch.Tensor, rate: float) -> torch.Tensor:
    """Keep, per row of `[R, K]` probabilities, the smallest set of classes holding `rate` of the mass
    (classes tied with the smallest kept one stay too) and renormalise, in place. (The sampler does the same
    in its own cache-sized blocks: `X0Distribution`.)"""
    if rate >= 1.0 or probs.shape[0] == 0:
        return probs
    keep_at_or_above(probs, truncation_threshold(probs, rate))
    return probs.mul_(probs.sum(dim=1, keepdim=True).reciprocal_())


def keep_at_or_above(probs: torch.Tensor, threshold: torch.Tensor, scratch: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Zero, in place, the probabilities below their row's threshold `[R, 1]` (not renormalised)."""
    # 1 where probs >= threshold, else 0: the sign of a float difference is exact. Float arithmetic, not a
    # boolean mask: on CPU, comparisons and masked_fill_ cost 5-30x an arithmetic pass
    difference = probs - threshold if scratch is None else torch.sub(probs, threshold, out=scratch)
    keep = difference.sign_().add_(1.0).clamp_(max=1.0)
    return probs.mul_(keep)


def sorted_threshold(probs: torch.Tensor, rate: float) -> torch.Tensor:
    """The smallest kept probability `[R, 1]` by the rule itself: a full sort of every row (the reference)."""
    values = probs.sort(dim=1, descending=True).values
    before = (values.double().cumsum(dim=1) < rate).sum(dim=1, keepdim=True)  # classes before the crossing
    return values.gather(1, before.clamp_(max=values.shape[1] - 1))


def truncation_threshold(probs: torch.Tensor, rate: float) -> torch.Tensor:
    """`sorted_threshold` without the sort: a histogram of mass over value buckets finds each row's crossing
    bucket; only the classes in it are sorted. float64 rows and rows crossing below the buckets' range (rates
    within ~K 2^-29 of 1) go to the reference."""
    if probs.dtype == torch.float64 or probs.shape[0] == 0:
        return sorted_threshold(probs, rate)
    values = probs.float().contiguous()  # exact for bfloat16 and float16
    workspace, crossings = Workspace(values.shape[1], values.shape[0], values.device), Crossings()
    for block in values.split(workspace.rows):
        crossings.add(block, rate, workspace)
    return crossings.resolve(rate)[0]


class Workspace:
    """Block-sized flat buffers for blocks of up to `rows` rows of K classes, viewed in each block's shape in
    turn. One set for every block of a call: fresh multi-MiB buffers per block are fresh pages from
    the kernel, whose page faults cost more than the arithmetic. On CPU a block is CHUNK_ELEMENTS (cache-sized),
    on an accelerator every row at once."""

    def __init__(self, num_classes: int, num_rows: int, device: torch.device):
        self.rows = max(1, CHUNK_ELEMENTS // num_classes) if in_cache_blocks(device) else num_rows
        size = min(self.rows, num_rows) * num_classes
        self.int32 = torch.empty(size, dtype=torch.int32, device=device)
        self.int64 = torch.empty(size, dtype=torch.int64, device=device)
        self.spread = torch.empty(size, dtype=torch.int32, device=device)
        self.float64 = torch.empty(size, dtype=torch.float64, device=device)
        self.mass = torch.empty(0, dtype=torch.float64, device=device)

    def view(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        """A buffer viewed as a contiguous `shape` (at most a block's elements)."""
        return getattr(self, name)[:shape[0] * shape[1]].view(shape)

    def zero_mass(self, shape: tuple[int, int]) -> torch.Tensor:
        if self.mass.numel() < shape[0] * shape[1]:
            self.mass = torch.empty(shape[0] * shape[1], dtype=torch.float64, device=self.mass.device)
        return self.view("mass", shape).zero_()


class Crossings:
    """Blocks of rows whose thresholds are found together: `add` locates each row's crossing bucket while its block
    is in cache and keeps the few classes in that bucket; `resolve` sorts the kept classes of every block at once
    (one set of small operations per call instead of per block)."""

    def __init__(self):
        self.count, self.above, self.row, self.picked, self.outside = 0, [], [], [], []

    def add(self, values: torch.Tensor, rate: float, workspace: Workspace) -> None:
        """Rows `[R, K]` (contiguous float32) after those added before."""
        num_rows, num_classes = values.shape
        # a row's classes below (1 - rate) / K hold less than 1 - rate together: its threshold lies above that
        index, index64, last = _bucket_index(values, max((1.0 - rate) / num_classes / 2, EXACT_FLOOR), workspace)
        mass = workspace.zero_mass((num_rows, last + BELOW_COLUMNS))
        from_top = mass.scatter_add_(1, index64, workspace.view("float64", values.shape).copy_(values))
        from_top = from_top.cumsum_(1)  # mass of buckets 0..j, non-decreasing from column 0, which holds nothing
        # [R]: the bucket holding the threshold, the count of columns below rate (a comparison pass costs 20x)
        crossing = torch.searchsorted(from_top, from_top.new_full((num_rows, 1), rate))
        self.above.append(from_top.gather(1, crossing - 1).squeeze(1))
        crossing = crossing.squeeze(1)
        in_range = crossing < last  # else the row crosses below the range or never reaches rate
        # the candidates: the classes in their row's crossing bucket (none in a row out of range)
        crossing_column = torch.where(in_range, crossing, -1).to(torch.int32).unsqueeze(1)
        row, column = (index == crossing_column).nonzero().unbind(1)
        self.row.append(row + self.count)
        self.picked.append(values[row, column])
        if not bool(in_range.all()):  # settled by the sort, as the reference
            outside = (~in_range).nonzero().squeeze(1)
            rows = values.index_select(0, outside)
            threshold = sorted_threshold(rows, rate)
            kept = torch.where(rows >= threshold, rows.double(), 0.0).sum(dim=1)
            self.outside.append((outside + self.count, threshold, kept))
        self.count += num_rows

    def resolve(self, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The threshold `[R, 1]` and kept mass `[R]` of every row added, in order."""
        threshold, kept = _within_bucket(torch.cat(self.picked), torch.cat(self.row), torch.cat(self.above),
                                         rate)
        for rows, low, mass in self.outside:
            threshold[rows], kept[rows] = low, mass
        return threshold, kept


def _bucket_index(values: torch.Tensor, floor: float, workspace: Workspace
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each value's histogram column `[R, K]` (int32, and an int64 copy for scatter_add_) and the first column
    below the range. Column 0 stays empty; buckets count from column 1 at the top: one per 1 / 2^BUCKET_BITS of a
    power of two from 1 (values above 1 join it) down to `floor`. Non-negative floats order as their bit patterns,
    so buckets order as values. The classes below the floor (most of a peaked row), summed into one address, would
    each wait for the addition before (4x the scatter's time): their low bits spread them over BELOW_COLUMNS
    columns from `last` on instead. Every pass but the last runs on int32 (half the bytes; a mixed-dtype
    operation would copy its input first)."""
    shift = 23 - BUCKET_BITS
    top, lowest = (int(torch.tensor(v, dtype=torch.float32).view(torch.int32)) >> shift for v in (1.0, floor))
    last = top - lowest + 2
    key = torch.bitwise_right_shift(values.view(torch.int32), shift, out=workspace.view("int32", values.shape))
    index = torch.sub(torch.tensor(top + 1, dtype=torch.int32, device=values.device), key.clamp_(max=top), out=key)
    # below the range: last + index mod BELOW_COLUMNS, never more than index itself; in range: index
    spread = torch.bitwise_and(index, BELOW_COLUMNS - 1, out=workspace.view("spread", values.shape))
    index = torch.minimum(index, spread.add_(last), out=index)
    return index, workspace.view("int64", values.shape).copy_(index), last


def _within_bucket(picked: torch.Tensor, row: torch.Tensor, above: torch.Tensor, rate: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The threshold `[R, 1]` and kept mass `[R]` among each row's candidate classes (values `picked` of rows
    `row`, those of its crossing bucket), given the float64 mass `above` `[R]` of the buckets above it: the
    candidates sorted by row, then descending."""
    num_rows = above.shape[0]
    # rows ascending, then values descending: the bit patterns of non-negative floats order as the values
    order = ((row << 31) | (0x7FFFFFFF - picked.view(torch.int32).long())).argsort()
    row, picked = row.index_select(0, order), picked.index_select(0, order)
    counts = torch.bincount(row, minlength=num_rows)
    width = max(int(counts.max()), 1) if num_rows else 1
    position = torch.arange(row.shape[0], device=row.device) - (counts.cumsum(0) - counts).index_select(0, row)
    padded = torch.zeros(num_rows, width, dtype=torch.float64, device=above.device)
    padded[row, position] = picked.double()
    before = (padded.cumsum(1).add_(above.unsqueeze(1)) < rate).sum(dim=1, keepdim=True)
    threshold = padded.gather(1, before.clamp_(max=width - 1))
    kept = above + torch.where(padded >= threshold, padded, 0.0).sum(dim=1)
    return threshold.float(), kept
