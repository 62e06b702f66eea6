"""Accuracy against training time, from the evaluations runs log while they train (train.eval_every):

    python scripts/learning_curves.py --runs outputs/shapes outputs/ddpm_shapes outputs/ddpm_shapes_latent \
        --labels "VQ-Diffusion" "DDPM pixel" "DDPM latent" --out docs/learning_curves.png

Plots one line per run (per-image accuracy of `--group` against training minutes, evaluations and previews not
counted) and prints each run's time to 50% and 80%.
"""

import argparse
from pathlib import Path

from vqdiff.errors import UserError, script_main
from vqdiff.eval.compare import logged_evaluations, run_log, time_to_accuracy
from vqdiff.images import line_plot


def minutes(value) -> str:
    return value if isinstance(value, str) else f"{value / 60:.1f} min"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (with log.jsonl)")
    parser.add_argument("--labels", nargs="+", default=None, help="one per run (default: the folder names)")
    parser.add_argument("--group", default="1 object", choices=("all", "1 object", "2 objects"))
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 0.8])
    parser.add_argument("--out", default="learning_curves.png")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(run).resolve().name for run in args.runs]
    if len(labels) != len(args.runs):
        raise UserError(f"--labels: {len(labels)} given for {len(args.runs)} runs")
    logs = [run_log(run) for run in args.runs]
    for run, log in zip(args.runs, logs):
        if not logged_evaluations(log, args.group):
            raise UserError(f"{run}: no logged evaluations of {args.group!r} (train with train.eval_every > 0)")
    series = {label: [(s / 60, 100 * a) for s, a in logged_evaluations(log, args.group)]
              for label, log in zip(labels, logs)}
    line_plot(series, "training minutes (evaluations not counted)", f"{args.group}, % per image").save(args.out)
    header = ["run", "evaluations", "last %"] + [f"to {100 * t:g}%" for t in args.thresholds]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, log in zip(labels, logs):
        points = series[label]
        cells = [label, str(len(points)), f"{points[-1][1]:.1f} (at {points[-1][0]:.1f} min)"]
        cells += [minutes(time_to_accuracy(log, t, args.group)) for t in args.thresholds]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    script_main(main, "learning_curves.py")
