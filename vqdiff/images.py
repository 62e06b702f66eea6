"""Pictures for people: tensors to PIL, captioned grids, GIFs, 2-D scatter plots and line plots (no matplotlib)."""

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


LINE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def line_plot(series: dict[str, list[tuple[float, float]]], x_label: str, y_label: str, y_range=(0.0, 100.0),
              size: tuple[int, int] = (640, 400), title: str | None = None) -> Image.Image:
    """Lines of (x, y) points, one colour per named series, with axes, ticks, grid lines and a legend."""
    if not series or not any(series.values()):
        raise ValueError("line_plot needs at least one series with points")
    width, height = size
    left, right, top, bottom = 56, 16, 40 if title else 24, 40
    x_max = max(x for points in series.values() for x, _ in points) or 1.0
    x_step = nice_step(x_max / 6)
    x_max = math.ceil(x_max / x_step) * x_step
    y_lo, y_hi = y_range
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (width - left - right) * x / x_max,
                height - bottom - (height - top - bottom) * (y - y_lo) / (y_hi - y_lo))

    y_step = nice_step((y_hi - y_lo) / 5)
    for k in range(int((y_hi - y_lo) / y_step + 1e-9) + 1):
        y = y_lo + k * y_step
        draw.line([at(0, y), at(x_max, y)], fill=(225, 225, 225))
        draw.text((4, at(0, y)[1] - 5), f"{y:g}", fill=(0, 0, 0), font=font)
    for k in range(int(x_max / x_step + 1e-9) + 1):
        x = k * x_step
        draw.line([at(x, y_lo), at(x, y_hi)], fill=(235, 235, 235))
        draw.text((at(x, y_lo)[0] - 6, height - bottom + 4), f"{x:g}", fill=(0, 0, 0), font=font)
    draw.rectangle([at(0, y_hi), at(x_max, y_lo)], outline=(0, 0, 0))
    draw.text(((width - 6 * len(x_label)) / 2, height - 16), x_label, fill=(0, 0, 0), font=font)
    draw.text((4, top - 16), y_label, fill=(0, 0, 0), font=font)
    if title:
        draw.text(((width - 6 * len(title)) / 2, 2), title, fill=(0, 0, 0), font=font)
    colours = [LINE_COLOURS[i % len(LINE_COLOURS)] for i in range(len(series))]
    for colour, points in zip(colours, series.values()):
        xy = [at(x, y) for x, y in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
    # the legend in the lower right corner, on white
    legend_width = 40 + 6 * max(len(name) for name in series)
    legend_x, legend_y = width - right - 8 - legend_width, height - bottom - 8 - 14 * len(series)
    draw.rectangle([legend_x - 4, legend_y - 4, legend_x + legend_width, legend_y + 14 * len(series)],
                   fill="white", outline=(200, 200, 200))
    for i, (colour, name) in enumerate(zip(colours, series)):
        y = legend_y + 14 * i
        draw.line([(legend_x, y + 5), (legend_x + 18, y + 5)], fill=colour, width=2)
        draw.text((legend_x + 24, y), name, fill=(0, 0, 0), font=font)
    return image


def nice_step(span: float) -> float:
    """1, 2 or 5 times a power of ten, the smallest such at least `span` (tick spacing)."""
    if span <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(span))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= span - 1e-12)
