"""The sampling trace's pieces: which steps it records and how it fills the masked tokens."""

import torch

from vqdiff.diffusion.x0_distribution import X0Distribution
from vqdiff.eval.trace import predicted_x0, record_steps


def test_record_steps_spread_and_keep_both_ends():
    assert record_steps(25) == [0, 3, 7, 10, 14, 17, 21, 24]
    assert record_steps(3) == [0, 1, 2]
    assert record_steps(1) == [0]
    assert record_steps(100, rows=2) == [0, 99]


def test_masked_tokens_take_the_guided_argmax_and_revealed_tokens_stay():
    """Three classes, [MASK] = 3. Token 0: cond (2, 1.5, 0), null (2, 0, 0): unguided argmax 0, guided at s = 3
    logits (2, 4.5, 0), argmax 1. Token 1 is revealed as class 2 and must stay whatever the logits say."""
    cond = torch.tensor([[[2.0, 2.0], [1.5, 9.0], [0.0, 0.0]]])  # [B=1, K=3, N=2]
    null = torch.tensor([[[2.0, 2.0], [0.0, 9.0], [0.0, 0.0]]])
    xt = torch.tensor([[3, 2]])
    guided = X0Distribution(cond, null, 3.0, 1.0, 1.0)
    assert predicted_x0(guided, xt, 3).tolist() == [[1, 2]]
    unguided = X0Distribution(cond, None, 1.0, 1.0, 1.0)
    assert predicted_x0(unguided, xt, 3).tolist() == [[0, 2]]
    # temperature and truncation leave the argmax where it is
    assert predicted_x0(X0Distribution(cond, null, 3.0, 0.5, 0.5), xt, 3).tolist() == [[1, 2]]
