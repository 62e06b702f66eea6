"""Attribute omission for shapes captions: each object's colour word and shape word are each left out of the
training caption with probability `prob` ("a large red triangle at the left" -> "a large triangle at the left" or
"a large red shape at the left"), the image unchanged.

Why: in the full captions a shape word always comes with one of the colours it was seen with, so the model may
read colour from the shape word (and the text tower, causal, folds the colour into the shape word's feature).
A caption without the colour word teaches the shape from the shape word alone, one without the shape word the
colour from the colour word alone, which is what an unseen colour-shape pair needs. The draws depend only on
(seed, epoch, index), so a resumed run sees the captions the uninterrupted one would.
"""

import numpy as np
from torch.utils.data import Dataset

from .captions import epoch_and_index
from .shapes import CANONICAL_JOINER, Object, parse_caption

_OMISSION_STREAM = 0x0A17_0B1E  # mixed into the seed so these draws are not the caption choice's


def omitted_phrase(obj: Object, drop_colour: bool, drop_shape: bool) -> str:
    """The canonical phrase of `obj` without its colour word and/or with "shape" for its shape word."""
    words = ["a", obj.size] + ([] if drop_colour else [obj.colour]) + ["shape" if drop_shape else obj.shape]
    return " ".join(words + ["at the", obj.position])


def omit_attributes(text: str, prob: float, rng: np.random.Generator) -> str:
    """`text` (a shapes caption) with each object's colour and shape word each dropped with probability `prob`."""
    objects = parse_caption(text)
    drops = rng.random((len(objects), 2)) < prob
    return CANONICAL_JOINER.join(omitted_phrase(obj, bool(c), bool(s)) for obj, (c, s) in zip(objects, drops))


class OmitAttributes(Dataset):
    """Wraps a data set of shapes items ({"caption": str, ...}) and rewrites each caption by `omit_attributes`."""

    def __init__(self, dataset, prob: float, seed: int = 0):
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"attribute omission probability must be in [0, 1), got {prob}")
        self.dataset, self.prob, self.seed, self.epoch = dataset, prob, seed, 0
        if hasattr(dataset, "collate"):
            self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, item: "int | tuple[int, int]") -> dict:
        epoch, index = epoch_and_index(item, self.epoch)
        inner = self.dataset[(epoch, index) if hasattr(self.dataset, "set_epoch") else index]
        rng = np.random.default_rng((self.seed, _OMISSION_STREAM, epoch, index))
        return {**inner, "caption": omit_attributes(inner["caption"], self.prob, rng)}
