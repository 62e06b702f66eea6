"""The attribute probe's bookkeeping against an oracle whose log-likelihoods are known."""

import torch

from vqdiff.data.shapes import Object, parse_caption
from vqdiff.eval.probe import ATTRIBUTE_VALUES, rewrites, score_rewrites


def test_rewrites_change_one_attribute_and_point_at_the_truth():
    obj = Object(shape="square", colour="blue", size="small", position="top right")
    captions, spans = rewrites(obj)
    assert len(captions) == sum(len(v) for v in ATTRIBUTE_VALUES.values()) == 21
    for name, (start, true) in spans.items():
        assert captions[start + true] == "a small blue square at the top right"
        for value, text in zip(ATTRIBUTE_VALUES[name], captions[start:start + len(ATTRIBUTE_VALUES[name])]):
            (parsed,) = parse_caption(text)
            assert getattr(parsed, name) == value
            assert all(getattr(parsed, other) == getattr(obj, other) for other in ATTRIBUTE_VALUES if other != name)


def test_an_oracle_that_reads_only_position_identifies_only_position():
    """log-lik 0 when the caption's position is the object's, -3 otherwise, whatever the colour, shape and size:
    position is identified every time with gain 3 * 8/9; the others tie, which does not count, with gain 0."""
    objects = [Object("circle", "red", "large", "left"), Object("diamond", "green", "small", "bottom right")]
    x0 = torch.zeros(2, 4, dtype=torch.long)
    truth = iter(objects)

    def oracle(tokens, captions):
        obj = next(truth)
        return torch.tensor([0.0 if parse_caption(c)[0].position == obj.position else -3.0 for c in captions])

    result = score_rewrites(oracle, x0, objects, progress=False)
    assert result.images == 2
    assert result.identified == {"position": 1.0, "colour": 0.0, "shape": 0.0, "size": 0.0}
    assert abs(result.gain["position"] - 3 * 8 / 9) < 1e-12
    assert all(result.gain[k] == 0 for k in ("colour", "shape", "size"))
    assert "position" in result.table().splitlines()[1]
