"""Top-p truncation: the histogram selection keeps exactly the classes of the sorted reference, and both follow
the rule checked by brute force (per row: sort, sum in float64, keep every class at or above the first value
whose running sum reaches the rate)."""

import pytest
import torch

from vqdiff.diffusion.truncation import Crossings, Workspace, sorted_threshold, truncate, truncation_threshold

K = 2887  # the COCO codebook
RATES = [1e-6, 0.3, 0.86, 0.99, 1 - 1e-7]


def brute_force_keep(probs: torch.Tensor, rate: float) -> torch.Tensor:
    """The rule, one row at a time in float64."""
    keep = torch.zeros(probs.shape, dtype=torch.bool)
    for i, row in enumerate(probs.double()):
        values = row.sort(descending=True).values
        reached = (values.cumsum(0) >= rate).nonzero()
        threshold = values[reached[0, 0]] if reached.numel() else values[-1]
        keep[i] = row >= threshold
    return keep


def check(probs: torch.Tensor, rate: float) -> None:
    threshold = truncation_threshold(probs, rate)
    assert torch.equal(threshold, sorted_threshold(probs.float(), rate)), rate
    keep = probs >= threshold
    assert torch.equal(keep, brute_force_keep(probs, rate)), rate
    mass, mass_above = ((probs.double() * keep).sum(1), (probs.double() * (probs > threshold)).sum(1))
    reachable = probs.double().sum(1) >= rate
    # the kept classes hold the rate, those above the smallest kept value do not
    assert (mass[reachable] >= rate).all() and (mass_above < rate).all()


def softmax_rows(scales, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.tensor(scales).repeat_interleave(100).unsqueeze(1) * torch.randn(100 * len(scales), K,
                                                                                   generator=generator)
    return logits.softmax(dim=1).to(dtype)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flat_and_peaked_softmax_rows(rate, dtype):
    """Near-uniform rows (an untrained network's, logit scale 0.3) to one-class rows (scale 30); more rows than a
    CPU block, so several blocks."""
    check(softmax_rows([0.3, 1.0, 2.0, 8.0, 30.0], dtype=dtype), rate)


@pytest.mark.parametrize("rate", RATES)
def test_random_weights(rate):
    """Uniform random weights normalised in float32 (not a softmax), with a few zero (masked) classes per row."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(64, K, generator=generator)
    weights[:, torch.randperm(K, generator=generator)[:100]] = 0.0
    probs = weights / weights.sum(dim=1, keepdim=True)
    check(probs, rate)
    check(probs.t().contiguous().t(), rate)  # a column-major view


def test_rows_of_a_trained_classifier():
    """Rows of a small model trained here to predict a noisy label among K: a few likely classes, a long tail."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(2048, 16, generator=generator)
    labels = (inputs @ torch.randn(16, K, generator=generator)).argmax(dim=1)
    labels = torch.where(torch.rand(2048, generator=generator) < 0.3, torch.randint(K, (2048,), generator=generator),
                         labels)
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, K))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 4.0  # well below log K = 8: the rows are peaked
    with torch.no_grad():
        probs = model(inputs[:256]).softmax(dim=1)
    assert probs.amax(1).median() > 0.2
    for rate in (0.5, 0.86, 0.95):
        check(probs, rate)


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.6, 0.86, 1 - 1e-7])
def test_ties_are_kept_together(rate):
    """Rows drawn from four values (ties everywhere, the crossing inside a tie group) and a uniform row."""
    generator = torch.Generator().manual_seed(3)
    levels = torch.tensor([1.0, 2.0, 4.0, 8.0])
    weights = levels[torch.randint(4, (32, K), generator=generator)]
    probs = torch.cat([weights / weights.sum(dim=1, keepdim=True), torch.full((1, K), 1.0 / K)])
    check(probs, rate)
    keep = probs >= truncation_threshold(probs, rate)
    assert keep[-1].all()  # the uniform row: every class ties with the crossing one
    smallest_kept = torch.where(keep, probs, 2.0).amin(1)
    assert (torch.where(keep, -1.0, probs).amax(1) < smallest_kept).all()  # a tie group is never split


@pytest.mark.parametrize("rate", [0.5, 0.75, 0.875, 1 - 2.0**-10])
def test_a_sum_equal_to_the_rate_stops_there(rate):
    """Powers of two sum exactly: where the running sum equals the rate, the next class is not kept."""
    generator = torch.Generator().manual_seed(7)
    probs = torch.zeros(8, K)
    for row in probs:
        row[torch.randperm(K, generator=generator)[:13]] = 2.0 ** -torch.tensor([*range(1, 13), 12.0])
    keep = probs >= truncation_threshold(probs, rate)
    assert (keep.sum(1) == round(-torch.log2(torch.tensor(1 - rate)).item())).all()
    check(probs, rate)


def test_rows_that_never_reach_the_rate_keep_everything():
    probs = torch.full((3, K), 0.5 / K)
    assert (probs >= truncation_threshold(probs, 0.86)).all()


@pytest.mark.parametrize("form", ["float32", "column-major", "bfloat16"])
def test_truncate_renormalises_the_kept_classes(form):
    """float32, column-major and bfloat16 rows (300 rows of K: several selection blocks), masked and
    renormalised in place."""
    probs = softmax_rows([0.3, 2.0, 8.0], seed=4)
    if form == "column-major":
        probs = probs.t().contiguous().t()
    elif form == "bfloat16":
        probs = probs.to(torch.bfloat16)
    keep = brute_force_keep(probs, 0.86)
    truncated = truncate(probs.clone(), 0.86)
    assert truncated.dtype == probs.dtype and torch.equal(truncated > 0, keep)
    expected = probs.double() * keep / (probs.double() * keep).sum(1, keepdim=True)
    torch.testing.assert_close(truncated.double(), expected, rtol=1e-2 if form == "bfloat16" else 1e-6, atol=0)
    assert truncate(probs.clone(), 1.0).equal(probs)
    assert truncate(probs[:0].clone(), 0.5).shape == (0, K)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("layout", ["row-major", "class-major"])
def test_threshold_and_kept_mass_of_a_block(rate, layout):
    """One block, rows in memory or classes in memory (the sampler's token table): the threshold of the reference
    and the mass of every class at or above it, in float64."""
    probs = softmax_rows([0.3, 2.0, 30.0], seed=8)[::4]  # 75 rows: one CPU block
    block = probs if layout == "row-major" else probs.t().contiguous().t()
    crossings = Crossings()
    crossings.add(block, rate, Workspace(K, block.shape[0], block.device))
    threshold, kept = crossings.resolve(rate)
    assert torch.equal(threshold, sorted_threshold(probs, rate))
    expected = torch.where(probs >= threshold, probs.double(), 0.0).sum(1)
    torch.testing.assert_close(kept, expected, rtol=0, atol=1e-15)


def test_float64_rows_use_the_reference():
    probs = softmax_rows([1.0], seed=5, dtype=torch.float64)
    assert torch.equal(truncation_threshold(probs, 0.86), sorted_threshold(probs, 0.86))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_threshold_on_cuda():
    probs = softmax_rows([0.3, 2.0, 30.0], seed=6)
    for rate in (0.3, 0.86, 1 - 1e-7):
        assert torch.equal(truncation_threshold(probs.cuda(), rate).cpu(), sorted_threshold(probs, rate))
