"""Shapes: the embedded text-to-image data set (no download).

Each image holds one or more coloured shapes on a white canvas; the caption names every object's
size, colour, shape and position, e.g. "a small blue square at the left and a large yellow
triangle at the bottom right". Geometry is given at 64 px and scales with size/64:

- colours: red, green, blue, yellow, purple, orange (RGB in COLOURS); background white
- shapes centred at (cx, cy) with extent s: circle (radius s/2), square (side s), triangle
  (apex (cx, cy - s/2), base corners (cx +- s/2, cy + s/2)), diamond (vertices (cx, cy +- s/2), (cx +- s/2, cy))
- sizes: small s=12, large s=20
- positions: the 3x3 grid of cells of side 64/3, centre = cell centre + uniform jitter of at most 2 px
- objects in one image have different cells and different colours

HELDOUT_PAIRS never appear in the train or val splits; every heldout image contains at least one.
Items are deterministic per (seed, split, index), so `dataset[i]` does not depend on access order.
"""

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (245, 130, 30),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, float] = {"small": 12.0, "large": 20.0}  # extent s at 64 px
SHAPE_AREAS: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / s^2
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SPLITS = ("train", "val", "heldout")
BASE_SIZE = 64
JITTER = 2.0  # px at 64

# One held-out shape per colour-shape row and column, so every colour and every shape is still
# seen in training with most partners: a model must compose them to draw these.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"),
})
_HELDOUT_LIST = tuple(sorted(HELDOUT_PAIRS))
ALL_PAIRS = tuple(product(COLOURS, SHAPES))
SEEN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELDOUT_PAIRS)

CANONICAL_TEMPLATE = "a {size} {colour} {shape} at the {position}"
PARAPHRASE_TEMPLATES = (
    CANONICAL_TEMPLATE,
    "{position}: a {size} {colour} {shape}",
    "there is a {size} {colour} {shape} at the {position}",
    "a {size} {shape} in {colour} at the {position}",
    "the {position} has a {size} {colour} {shape}",
)
CANONICAL_JOINER = " and "
PARAPHRASE_JOINERS = (" and ", "; ")

_PALETTE = {name: np.asarray(rgb, dtype=np.float64) for name, rgb in COLOURS.items()}
_UNIT_RANGE = np.arange(256, dtype=np.float32) / 127.5 - 1  # uint8 value -> [-1, 1]
_SPLIT_CODES = {"train": 1, "val": 2, "heldout": 3}
_MASK64 = (1 << 64) - 1
_AUGMENT_STREAM = 0x2545F4914F6CDD1D  # xor-ed into an item's seed for its augmentation draws


@dataclass(frozen=True)
class Object:
    """One object of a caption; its jitter is not part of it (see `random_scene`)."""
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; expected one of {list(allowed)}")

    def phrase(self, template: str = CANONICAL_TEMPLATE) -> str:
        return template.format(size=self.size, colour=self.colour, shape=self.shape, position=self.position)

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT_PAIRS

    def to_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


def cell_of(position: str) -> tuple[int, int]:
    """(row, column) of a position word in the 3x3 grid."""
    return divmod(POSITIONS.index(position), 3)


def cell_centre(position: str, size: int = BASE_SIZE) -> tuple[float, float]:
    """(x, y) centre of a position's cell in pixels of a `size` canvas."""
    row, col = cell_of(position)
    cell = size / 3
    return (col + 0.5) * cell, (row + 0.5) * cell


def caption(objects: Sequence[Object]) -> str:
    """The canonical caption: object phrases joined by " and "."""
    return CANONICAL_JOINER.join(obj.phrase() for obj in objects)


def paraphrase(objects: Sequence[Object], generator: torch.Generator | None = None) -> str:
    """A caption with a random template per object and a random joiner (training variety only)."""
    u = torch.rand(len(objects) + 1, generator=generator, dtype=torch.float64).tolist()
    phrases = [obj.phrase(PARAPHRASE_TEMPLATES[int(v * len(PARAPHRASE_TEMPLATES))]) for obj, v in zip(objects, u)]
    return PARAPHRASE_JOINERS[int(u[-1] * len(PARAPHRASE_JOINERS))].join(phrases)


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so "top left" wins over "top".
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


def _template_regex(template: str) -> re.Pattern:
    groups = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}
    pattern = re.escape(template)
    for name, words in groups.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{_alternation(words)})")
    return re.compile(pattern)


_PHRASE_REGEXES = tuple(_template_regex(template) for template in PARAPHRASE_TEMPLATES)
_JOINER_REGEX = re.compile(r"\s+and\s+|\s*;\s*")


def parse_caption(text: str) -> list[Object]:
    """The objects named by a caption (canonical or paraphrased); ValueError on text outside the grammar."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    normal = " ".join(text.lower().split()).rstrip(".")
    if not normal:
        raise ValueError("cannot parse an empty caption")
    objects = []
    for part in _JOINER_REGEX.split(normal):
        match = next((m for m in (regex.fullmatch(part) for regex in _PHRASE_REGEXES) if m), None)
        if match is None:
            raise ValueError(f"cannot parse {part!r} in caption {text!r}: expected phrases like "
                             f"'{CANONICAL_TEMPLATE}' joined by 'and', with size in {list(SIZES)}, "
                             f"colour in {list(COLOURS)}, shape in {list(SHAPES)}, position in {list(POSITIONS)}")
        objects.append(Object(**match.groupdict()))
    return objects


def random_scene(split: str = "train", max_objects: int = 2, generator: torch.Generator | None = None
                 ) -> tuple[list[Object], list[tuple[float, float]]]:
    """A random list of 1..max_objects objects for `split` and their centre jitters (dx, dy) at 64 px."""
    _check_split(split)
    _check_max_objects(max_objects)
    u = iter(torch.rand(2 + 5 * max_objects, generator=generator, dtype=torch.float64).tolist())
    count = 1 + int(next(u) * max_objects)
    heldout_slot = int(next(u) * count)
    free_cells = list(POSITIONS)
    objects, offsets = [], []
    for i in range(count):
        if split == "heldout":
            pairs = _HELDOUT_LIST if i == 0 else ALL_PAIRS
        else:
            pairs = SEEN_PAIRS
        used = {obj.colour for obj in objects}
        pairs = [pair for pair in pairs if pair[0] not in used]
        colour, shape = pairs[int(next(u) * len(pairs))]
        size = "small" if next(u) < 0.5 else "large"
        position = free_cells.pop(int(next(u) * len(free_cells)))
        objects.append(Object(shape, colour, size, position))
        offsets.append(((2 * next(u) - 1) * JITTER, (2 * next(u) - 1) * JITTER))
    if split == "heldout":  # the held-out object was drawn first; put it anywhere in the caption
        objects.insert(heldout_slot, objects.pop(0))
        offsets.insert(heldout_slot, offsets.pop(0))
    return objects, offsets


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Whether sample points at offsets (dx [1, X], dy [Y, 1]) from the centre lie in the shape; [Y, X]."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= half
    # triangle: apex at dy = -half; the half-width grows by 1/2 per unit of depth below it
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)


def coverage(shape: str, centre: tuple[float, float], extent: float, window: tuple[int, int, int, int],
             supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel of `window` = (x0, y0, x1, y1) covered by a shape; [y1 - y0, x1 - x0] float64.

    Coordinates are continuous pixels (pixel i covers [i, i+1)); each pixel is sampled at
    supersample x supersample points.
    """
    x0, y0, x1, y1 = window
    cx, cy = centre
    sub = (np.arange(supersample) + 0.5) / supersample
    dx = (np.arange(x0, x1)[:, None] + sub).reshape(1, -1) - cx  # [1, X*ss]
    dy = (np.arange(y0, y1)[:, None] + sub).reshape(-1, 1) - cy  # [Y*ss, 1]
    inside = _inside(shape, dx, dy, extent / 2).astype(np.float64)  # [Y*ss, X*ss]
    # Strided sums pool the samples of each pixel (much faster than a mean over a 4-D reshape).
    columns = sum(inside[:, k::supersample] for k in range(supersample))  # [Y*ss, X]
    return sum(columns[k::supersample] for k in range(supersample)) / supersample ** 2


def _paint(canvas: np.ndarray, obj: Object, offset: tuple[float, float], supersample: int,
           extent_scale: float = 1.0) -> None:
    """Alpha-blend one object into canvas [H, W, 3] (float, 0..255) with its exact pixel coverage."""
    size = canvas.shape[0]
    scale = size / BASE_SIZE
    x, y = cell_centre(obj.position, BASE_SIZE)
    cx, cy = (x + offset[0]) * scale, (y + offset[1]) * scale
    half = SIZES[obj.size] / 2 * scale * extent_scale
    x0, x1 = max(0, math.floor(cx - half)), min(size, math.ceil(cx + half))
    y0, y1 = max(0, math.floor(cy - half)), min(size, math.ceil(cy + half))
    if x0 >= x1 or y0 >= y1:
        return
    alpha = coverage(obj.shape, (cx, cy), 2 * half, (x0, y0, x1, y1), supersample)[..., None]  # [Y, X, 1]
    window = canvas[y0:y1, x0:x1]
    window += alpha * (_PALETTE[obj.colour] - window)


def render_array(objects: Sequence[Object], size: int = BASE_SIZE,
                 offsets: Sequence[tuple[float, float]] | None = None, supersample: int = 4,
                 extent_scales: Sequence[float] | None = None) -> np.ndarray:
    """Like `render`, as a uint8 array [size, size, 3]; `extent_scales` multiply each object's extent."""
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be at least 1, got {supersample}")
    if offsets is None:
        offsets = [(0.0, 0.0)] * len(objects)
    if len(offsets) != len(objects):
        raise ValueError(f"got {len(offsets)} offsets for {len(objects)} objects")
    if extent_scales is None:
        extent_scales = [1.0] * len(objects)
    canvas = np.full((size, size, 3), BACKGROUND, dtype=np.float64)
    for obj, offset, extent_scale in zip(objects, offsets, extent_scales):
        _paint(canvas, obj, offset, supersample, extent_scale)
    return (canvas + 0.5).astype(np.uint8)  # round to nearest


def render(objects: Sequence[Object], size: int = BASE_SIZE, offsets: Sequence[tuple[float, float]] | None = None,
           supersample: int = 4) -> Image.Image:
    """Draw `objects` (later ones on top) on a white `size` x `size` RGB canvas.

    `offsets` are the centre jitters (dx, dy) in pixels at 64 px (scaled with the canvas). Each
    pixel's colour is blended by the fraction of its supersample x supersample sample points inside
    the shape, i.e. box-filtered anti-aliasing of the exact geometry.
    """
    return Image.fromarray(render_array(objects, size, offsets, supersample))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def _check_max_objects(max_objects: int) -> None:
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects must be in 1..{len(COLOURS)} (objects have distinct colours), "
                         f"got {max_objects}")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed for one item, mixed from (seed, split, index) so streams do not overlap."""
    _check_split(split)
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ _SPLIT_CODES[split])
    return _splitmix64(x ^ index) >> 1


class ShapesDataset(torch.utils.data.Dataset):
    """Items {"image": FloatTensor [3, size, size] in [-1, 1], "caption": str, "objects": list[Object]}.

    Rendered on the fly, deterministic per (seed, split, index). Batch with `collate` (the default
    collation cannot stack dataclasses). `paraphrase=True` varies the caption wording (training only).

    Augmentation for tokenizer training (the scenes, and so the colour-shape pairs, stay those of the split; the
    captions no longer describe sizes and places exactly): `extent_range` (lo, hi) multiplies each object's
    extent by a uniform draw, `shift` adds a uniform centre shift of at most that many pixels at 64 px, `flip`
    mirrors the image left-right and top-bottom at random. Drawn from their own stream, so the scene of an item
    does not depend on them.
    """

    def __init__(self, split: str = "train", size: int = BASE_SIZE, num_samples: int = 10_000, seed: int = 0,
                 max_objects: int = 2, paraphrase: bool = False, supersample: int = 4,
                 extent_range: Sequence[float] | None = None, shift: float = 0.0, flip: bool = False):
        _check_split(split)
        _check_max_objects(max_objects)
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if extent_range is not None and not (len(extent_range) == 2 and 0 < extent_range[0] <= extent_range[1]):
            raise ValueError(f"extent_range must be [lo, hi] with 0 < lo <= hi, got {extent_range}")
        if shift < 0:
            raise ValueError(f"shift must be non-negative, got {shift}")
        self.extent_range = None if extent_range is None else (float(extent_range[0]), float(extent_range[1]))
        self.shift = float(shift)
        self.flip = flip
        self.split = split
        self.size = size
        self.num_samples = num_samples
        self.seed = seed
        self.max_objects = max_objects
        self.paraphrase = paraphrase
        self.supersample = supersample

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self, index: int) -> torch.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return torch.Generator().manual_seed(item_seed(self.seed, self.split, index))

    def scene(self, index: int) -> tuple[list[Object], list[tuple[float, float]]]:
        """Objects and jitters of item `index`, without rendering."""
        return random_scene(self.split, self.max_objects, self._generator(index))

    def caption(self, index: int) -> str:
        generator = self._generator(index)
        objects, _ = random_scene(self.split, self.max_objects, generator)
        return paraphrase(objects, generator) if self.paraphrase else caption(objects)

    def _augmented(self, index: int, offsets: list[tuple[float, float]]
                   ) -> tuple[list[tuple[float, float]], list[float], tuple[bool, bool]]:
        """Shifted offsets, extent scales and (left-right, top-bottom) flips of item `index`."""
        u = torch.Generator().manual_seed(item_seed(self.seed, self.split, index) ^ _AUGMENT_STREAM)
        draws = torch.rand(3 * len(offsets) + 2, generator=u, dtype=torch.float64).tolist()
        lo, hi = self.extent_range or (1.0, 1.0)
        shifted, scales = [], []
        for i, (dx, dy) in enumerate(offsets):
            a, b, c = draws[3 * i:3 * i + 3]
            shifted.append((dx + (2 * a - 1) * self.shift, dy + (2 * b - 1) * self.shift))
            scales.append(lo + (hi - lo) * c)
        flips = (self.flip and draws[-2] < 0.5, self.flip and draws[-1] < 0.5)
        return shifted, scales, flips

    def __getitem__(self, index: int) -> dict:
        generator = self._generator(index)
        objects, offsets = random_scene(self.split, self.max_objects, generator)
        text = paraphrase(objects, generator) if self.paraphrase else caption(objects)
        scales, flips = None, (False, False)
        if self.extent_range is not None or self.shift > 0 or self.flip:
            offsets, scales, flips = self._augmented(index, offsets)
        image = render_array(objects, self.size, offsets, self.supersample, scales)  # [H, W, 3]
        if flips[0]:
            image = image[:, ::-1]
        if flips[1]:
            image = image[::-1]
        image = np.ascontiguousarray(image.transpose(2, 0, 1))  # [3, H, W]
        return {"image": torch.from_numpy(_UNIT_RANGE[image]), "caption": text, "objects": objects}


def collate(items: Sequence[dict]) -> dict:
    """Batch ShapesDataset items: {"image": [B, 3, H, W], "caption": list[str], "objects": list[list[Object]]}."""
    return {
        "image": torch.stack([item["image"] for item in items]),
        "caption": [item["caption"] for item in items],
        "objects": [item["objects"] for item in items],
    }


def eval_prompts(split: str = "val", n: int = 500, seed: int = 0, max_objects: int = 2
                 ) -> list[tuple[str, list[Object]]]:
    """A fixed list of (canonical caption, objects): the first n items of ShapesDataset(split, seed=seed)."""
    dataset = ShapesDataset(split, num_samples=n, seed=seed, max_objects=max_objects)
    prompts = []
    for index in range(n):
        objects, _ = dataset.scene(index)
        prompts.append((caption(objects), objects))
    return prompts
