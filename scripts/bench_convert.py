"""Peak memory and time of `vqdiff convert official` on a B-size released checkpoint.

    python scripts/bench_convert.py [--keys ../shared/interop/official_coco_keys.tsv] [--workdir /tmp/bench_convert]

No released file can be downloaded here, so this builds one of the same size from the published key list: every
key at its shape and dtype with random values, `model` holding all of them and `ema` the copy of everything under
`transformer.` (as the released files do), plus a codes map shaped like taming_vqvae_2887.pt. The conversion runs
in a child process; the table gives its peak resident memory against one float32 copy of the converted weights
(the target: about two copies). The memory-mapped file's pages count in the resident memory once read.
"""

import argparse
import csv
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from vqdiff.errors import script_main

DEFAULT_KEYS = Path(__file__).resolve().parents[2] / "shared" / "interop" / "official_coco_keys.tsv"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}  # all the listing holds


def fake_checkpoint(keys_tsv: Path, path: Path, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    model = {}
    with open(keys_tsv) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            shape = tuple(int(n) for n in row["shape"].split("x")) if row["shape"] else ()
            model[row["key"]] = (torch.randn(shape, generator=generator) * 0.02).to(DTYPES[row["dtype"]])
    for key in model:  # the quantizer is stored under enc and dec, one module: equal copies
        twin = key.replace("content_codec.dec.quantize.", "content_codec.enc.quantize.")
        if twin != key and twin in model:
            model[key] = model[twin].clone()
    ema = {key[len("transformer."):]: value.clone() for key, value in model.items() if key.startswith("transformer.")}
    torch.save({"model": model, "ema": ema, "last_epoch": 0, "last_iter": 0}, path)


def fake_codes_map(path: Path, used: int = 2886, full: int = 8192, seed: int = 0) -> None:
    codes = torch.randperm(full, generator=torch.Generator().manual_seed(seed))[:used].sort().values
    table = torch.zeros(full, dtype=torch.long)
    table[codes] = torch.arange(1, used + 1)  # used codes -> 1..n in increasing order, the rest -> 0
    torch.save(table, path)


def tensor_bytes(directory: Path) -> int:
    """Bytes of the converted weights as float32 (what one copy of them takes in memory)."""
    from safetensors import safe_open
    total = 0
    for file in directory.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys()) * 4
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=Path, default=DEFAULT_KEYS, help="key list of the released file (.tsv)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_convert"))
    parser.add_argument("--keep", action="store_true", help="keep the fake checkpoint and the converted directory")
    args = parser.parse_args(argv)
    if not args.keys.is_file():
        sys.exit(f"no key list at {args.keys} (the shared interop notes); pass --keys")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, codes, out = args.workdir / "fake_b.pth", args.workdir / "codes_2887.pt", args.workdir / "converted"
    started = time.perf_counter()
    fake_checkpoint(args.keys, ckpt)
    fake_codes_map(codes)
    print(f"wrote {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "import sys; from vqdiff.cli import main; sys.exit(main())",
               "convert", "official", str(ckpt), "--out", str(out), "--codes-map", str(codes)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    one_copy = tensor_bytes(out)
    print("| file | converted weights (fp32) | peak resident memory | copies | seconds |")
    print("|---|---|---|---|---|")
    print(f"| {ckpt.stat().st_size / 2**30:.2f} GiB | {one_copy / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB "
          f"| {peak / one_copy:.2f} | {seconds:.0f} |")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    script_main(main, "bench_convert.py")
