"""The Shapes metric's picture: sampled images with their captions, wrong objects outlined."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.shapes import cell_of
from .shapes import image_array

def _wrap(text: str, font: ImageFont.ImageFont, width: float, draw: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _outline_boxes(score: dict, image_size: int) -> list[tuple[tuple[float, ...], tuple[int, int, int]]]:
    """(box, outline colour) for wrong objects: the region found (black) or, if none, the named cell (grey)."""
    boxes = []
    cell = image_size / 3
    for result in score["objects"]:
        if result["correct"]:
            continue
        if result["detection"] is not None:
            boxes.append((result["detection"].box, (0, 0, 0)))
        else:
            row, col = cell_of(result["object"].position)
            boxes.append(((col * cell, row * cell, (col + 1) * cell, (row + 1) * cell), (128, 128, 128)))
    boxes.extend((extra.box, (0, 0, 0)) for extra in score["extra"])
    return boxes


def make_grid(images: Sequence[Any], captions: Sequence[str], scores: Sequence[dict] | None = None,
              columns: int = 8, tile: int = 128, text_lines: int = 4) -> Image.Image:
    """A PNG-ready grid: each image enlarged to `tile` px with its caption below.

    With `scores` (score_image results, e.g. ShapesReport.scores), wrong objects and extra regions
    are outlined in black, missing objects' cells in grey, and failed captions are written in red.
    """
    if len(images) != len(captions) or (scores is not None and len(scores) != len(images)):
        raise ValueError("make_grid needs one caption (and score, if given) per image")
    if not images:
        raise ValueError("make_grid needs at least one image")
    font = ImageFont.load_default()
    line_height = 12
    cell_w, cell_h, pad = tile, tile + text_lines * line_height + 4, 4
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (min(columns, len(images)) * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, captions)):
        pixels = image_array(image)
        scale = tile / pixels.shape[0]
        x, y = pad + (i % columns) * (cell_w + pad), pad + (i // columns) * (cell_h + pad)
        picture = Image.fromarray(np.rint(pixels).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
        grid.paste(picture, (x, y))
        draw.rectangle([x - 1, y - 1, x + tile, y + tile], outline=(200, 200, 200))
        correct = True
        if scores is not None:
            correct = scores[i]["correct"]
            for box, colour in _outline_boxes(scores[i], pixels.shape[0]):
                left, top, right, bottom = (v * scale for v in box)
                draw.rectangle([x + left - 1, y + top - 1, x + right, y + bottom], outline=colour, width=2)
        lines = _wrap(text, font, tile, draw)[:text_lines]
        draw.multiline_text((x, y + tile + 3), "\n".join(lines), fill=(0, 0, 0) if correct else (200, 0, 0),
                            font=font, spacing=line_height - 10)
    return grid
