"""What `vqdiff serve` adds over calling the pipeline: one model, the same request both ways, in one process.

    python scripts/bench_serve.py --model outputs/quickstart/shapes_tiny --n 4 --steps 25 --repeats 5

Prints a table: `pipe(...)` alone, POST /api/generate through a local uvicorn server, the streaming endpoint's
first frame and last event (the page's view), and the server's overhead in percent of the pipeline's time.
"""

import argparse
import statistics
import time

import torch

from vqdiff.errors import script_main
from vqdiff.images import make_grid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a text-to-image run or pipeline folder")
    parser.add_argument("--prompt", default="a large red circle at the top left")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    import httpx
    from vqdiff.pipeline import load_pipeline
    from vqdiff.serve.app import create_app
    from vqdiff.serve.live import live_server
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    body = {"prompt": args.prompt, "n": args.n, "steps": args.steps, "seed": 0}

    def direct():
        images = pipe([args.prompt] * args.n, torch.Generator().manual_seed(0), progress=False, steps=args.steps)
        return make_grid(images, nrow=min(args.n, 4))

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    app = create_app(pipe, max_batch=max(8, args.n))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        def through_api():
            assert client.post("/api/generate", json=body).status_code == 200

        def streamed():
            start, first = time.perf_counter(), None
            with client.stream("POST", "/api/stream", json=body) as response:
                for line in response.iter_lines():
                    if first is None and line.startswith("event: frame"):
                        first = time.perf_counter() - start
            return first, time.perf_counter() - start

        direct(), through_api(), streamed()  # warm-up
        rows = {"pipe(...)": [], "POST /api/generate": [], "stream: first frame": [], "stream: done": []}
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            rows["pipe(...)"].append(timed(direct))
            rows["POST /api/generate"].append(timed(through_api))
            first, done = streamed()
            rows["stream: first frame"].append(first)
            rows["stream: done"].append(done)
    print(f"{args.model}: {args.n} images, {args.steps} steps, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| what | seconds |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} |")
    base = statistics.median(rows["pipe(...)"])
    print(f"| server overhead (generate) | {100 * (statistics.median(rows['POST /api/generate']) / base - 1):+.1f}% |")
    print(f"| server overhead (stream, frames included) | "
          f"{100 * (statistics.median(rows['stream: done']) / base - 1):+.1f}% |")


if __name__ == "__main__":
    script_main(main, "bench_serve.py")
