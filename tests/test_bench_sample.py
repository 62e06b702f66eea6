"""The sampling benchmark runs and prints its table (speed targets live in the script, not in tests)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sample_prints_a_row_per_batch():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench_sample.py"), "--configs", "shapes", "--batch", "1",
                          "2", "--steps", "2", "--runs", "2", "3", "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| shapes")]
    assert [int(row[1]) for row in rows] == [1, 2]
    for row in rows:
        step, network, rates = float(row[2]), float(row[3]), [float(v) for v in row[7:9]]
        math = float(row[4].split()[0])  # timed alone, with the network's logits computed beforehand
        assert step > 0 and network > 0 and 0 < math < step and all(r > 0 for r in rates)
