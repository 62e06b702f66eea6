"""Pictures for people: tensors to PIL, captioned grids, GIFs and 2-D scatter plots (no matplotlib)."""

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [-1, 1] (C = 1 or 3) -> PIL image."""
    x = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        return Image.fromarray(x[0].numpy(), mode="L")
    return Image.fromarray(x.permute(1, 2, 0).numpy(), mode="RGB")


def make_grid(images, nrow: int | None = None, captions: list[str] | None = None, pad: int = 2,
              scale: int = 1, caption_width: int = 24) -> Image.Image:
    """Tile PIL images or [C, H, W] tensors into one RGB picture, with a caption under each if given."""
    tiles = [im if isinstance(im, Image.Image) else to_pil(im) for im in images]
    if not tiles:
        raise ValueError("make_grid needs at least one image")
    tiles = [t.convert("RGB") for t in tiles]
    if scale != 1:
        tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    w, h = tiles[0].size
    nrow = nrow or math.ceil(math.sqrt(len(tiles)))
    ncol_rows = math.ceil(len(tiles) / nrow)
    font = ImageFont.load_default()
    lines = [textwrap.wrap(c, caption_width) or [""] for c in captions] if captions else None
    text_h = (max(len(x) for x in lines) * 11 + 4) if lines else 0
    cell_w = max(w, caption_width * 6 + 4) if lines else w
    grid = Image.new("RGB", (nrow * (cell_w + pad) + pad, ncol_rows * (h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        x0, y0 = pad + c * (cell_w + pad), pad + r * (h + text_h + pad)
        grid.paste(tile, (x0 + (cell_w - w) // 2, y0))
        for j, line in enumerate(lines[i] if lines else []):
            draw.text((x0 + 2, y0 + h + 2 + 11 * j), line, fill=(0, 0, 0), font=font)
    return grid


def save_gif(frames: list[Image.Image], path: "str | Path", duration_ms: int = 80, hold_last_ms: int = 1200) -> None:
    """Animated GIF; the last frame is held longer so the result can be seen."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def scatter(points: torch.Tensor, reference: torch.Tensor | None = None, size: int = 256,
            extent: float = 3.0) -> Image.Image:
    """Scatter plot of 2-D points [N, 2] in [-extent, extent]^2 (reference points in grey behind)."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def plot(pts, colour):
        xy = ((pts.detach().float().cpu().clamp(-extent, extent) / extent + 1) * (size - 1) / 2).tolist()
        for x, y in xy:
            draw.point((x, size - 1 - y), fill=colour)

    if reference is not None:
        plot(reference, (190, 190, 190))
    plot(points, (30, 90, 200))
    return image
