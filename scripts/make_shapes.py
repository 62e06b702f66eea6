"""Write the Shapes data set as PNG files plus metadata.jsonl, and/or a captioned grid of samples.

    python scripts/make_shapes.py --out data/shapes_train --n 10000 --split train
    python scripts/make_shapes.py --grid docs/shapes_grid.png

metadata.jsonl holds one {"file_name", "text"} per line, the format of the generic captioned-folder loader.
"""

import argparse
import json
import logging
from pathlib import Path

from tqdm import tqdm

from vqdiff.data.shapes import SPLITS, ShapesDataset, render
from vqdiff.errors import script_main
from vqdiff.eval.shapes_grid import make_grid

logger = logging.getLogger("make_shapes")


def write_folder(dataset: ShapesDataset, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(len(dataset) - 1)))
    with open(out / "metadata.jsonl", "w") as metadata:
        for index in tqdm(range(len(dataset)), desc=f"writing {out}"):
            objects, offsets = dataset.scene(index)
            name = f"{index:0{digits}d}.png"
            render(objects, dataset.size, offsets, dataset.supersample).save(out / name)
            metadata.write(json.dumps({"file_name": name, "text": dataset.caption(index)}) + "\n")
    logger.info("wrote %d images and metadata.jsonl to %s", len(dataset), out)


def write_grid(dataset: ShapesDataset, path: Path, count: int, columns: int) -> None:
    items = [dataset[i] for i in range(count)]
    grid = make_grid([item["image"] for item in items], [item["caption"] for item in items], columns=columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    logger.info("wrote a grid of %d samples to %s", len(items), path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the PNG files and metadata.jsonl")
    parser.add_argument("--n", type=int, default=1000, help="number of images to write")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--size", type=int, default=64, help="canvas size in pixels (32, 64, 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=2)
    parser.add_argument("--paraphrase", action="store_true", help="vary the caption wording")
    parser.add_argument("--grid", type=Path, help="also write a captioned grid of samples to this PNG")
    parser.add_argument("--grid-n", type=int, default=24, help="samples in the grid")
    parser.add_argument("--grid-columns", type=int, default=6)
    args = parser.parse_args(argv)
    if args.out is None and args.grid is None:
        parser.error("give --out DIR and/or --grid PATH")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    def dataset(n: int) -> ShapesDataset:
        return ShapesDataset(args.split, size=args.size, num_samples=n, seed=args.seed,
                             max_objects=args.max_objects, paraphrase=args.paraphrase)

    if args.out is not None:
        write_folder(dataset(args.n), args.out)
    if args.grid is not None:
        write_grid(dataset(args.grid_n), args.grid, args.grid_n, args.grid_columns)


if __name__ == "__main__":
    script_main(main, "make_shapes.py")
