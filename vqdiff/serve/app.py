"""`vqdiff serve`: one loaded text-to-image model behind a local web page and an HTTP API (Starlette + uvicorn).

    GET  /              the page: prompt, sampling options, the images as they form, the grid to download
    GET  /api/info      the model: type, parameters, token grid, codes, defaults, limits
    POST /api/generate  JSON {"prompt", "n", "seed", and the model's sampling options} -> image/png grid
    POST /api/stream    the same JSON -> server-sent events: "queued", "frame" (a few per second), "done" / "error"

One model, one job at a time: requests wait in a first-in first-out queue (one worker thread); a client that
leaves cancels its job, queued or running, at the next sampling step. Bad input gets 400 with {"error": ...}
naming the field; nothing a client sends names a file.
"""

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import ConfigError
from ..images import make_grid
from .requests import BadRequest, GenerateRequest, RequestRules

FRAME_INTERVAL = 0.2  # seconds between streamed frames (the first one goes out at once)


class Cancelled(Exception):
    """The client left: the job stops between two sampling steps."""


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class Worker:
    """Runs sampling jobs one at a time on one thread, in the order they came."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqdiff-serve")
        self.waiting = 0  # jobs submitted and not started
        self.finished_jobs = self.cancelled_jobs = 0  # written by the worker thread only
        self._count = threading.Lock()

    def submit(self, request: GenerateRequest, cancelled: threading.Event, on_frame=None):
        with self._count:
            self.waiting += 1
        return self.executor.submit(self._run, request, cancelled, on_frame)

    def _run(self, request: GenerateRequest, cancelled: threading.Event, on_frame):
        with self._count:
            self.waiting -= 1
        try:
            grid = self._sample(request, cancelled, on_frame)
        except Cancelled:
            self.cancelled_jobs += 1
            raise
        self.finished_jobs += 1
        return grid

    @torch.no_grad()
    def _sample(self, request: GenerateRequest, cancelled: threading.Event, on_frame):
        if cancelled.is_set():
            raise Cancelled()
        pipe = self.pipe
        total = pipe.sampling_options(**request.options)["steps"] or pipe.diffusion.num_timesteps
        generator = torch.Generator(pipe.device).manual_seed(request.seed)
        prompts = [request.prompt] * request.n
        state, last = None, -FRAME_INTERVAL
        for step, state in enumerate(pipe.sample_iter(prompts, generator, progress=False, **request.options), 1):
            if cancelled.is_set():
                raise Cancelled()
            if on_frame is not None and step < total and time.monotonic() - last >= FRAME_INTERVAL:
                on_frame(step, total, make_grid(pipe.decode_partial(state), nrow=_columns(request.n)))
                last = time.monotonic()
        return make_grid(pipe.decode(state), nrow=_columns(request.n))


def _columns(n: int) -> int:
    return min(n, 4)


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(pipe, max_batch: int = 8) -> Starlette:
    """The ASGI app serving `pipe` (a TextToImagePipeline or GaussianTextToImagePipeline)."""
    if not hasattr(pipe, "decode_partial") or not hasattr(getattr(pipe, "model", None), "text_encoder"):
        raise ConfigError(f"vqdiff serve needs a text-to-image model; {type(pipe).__name__} has no text input")
    if max_batch < 1:
        raise ConfigError(f"--max-batch: {max_batch} is below 1")
    rules = RequestRules(pipe, max_batch)
    worker = Worker(pipe)
    page = resources.files(__package__).joinpath("page.html").read_text()

    async def parse(request: Request) -> GenerateRequest:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not JSON; send {\"prompt\": \"...\"} with Content-Type "
                             "application/json")
        return rules.parse(body)

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(rules.info())

    async def generate(request: Request) -> Response:
        job = await parse(request)
        cancelled = threading.Event()
        future = asyncio.wrap_future(worker.submit(job, cancelled))
        while not future.done():
            done, _ = await asyncio.wait({future}, timeout=0.1)
            if not done and await request.is_disconnected():
                cancelled.set()
                return Response(status_code=499)
        try:
            grid = future.result()
        except (ValueError, ConfigError) as error:
            return _bad(str(error))
        return Response(png_bytes(grid), media_type="image/png")

    async def stream(request: Request) -> Response:
        job = await parse(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def send(kind: str, data: dict) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))

        def on_frame(step: int, total: int, image) -> None:
            send("frame", {"step": step, "total": total, "image": data_url(image)})

        future = worker.submit(job, cancelled, on_frame)
        ahead = worker.waiting - 1

        def finished(done) -> None:
            if done.cancelled() or isinstance(done.exception(), Cancelled):
                return
            error = done.exception()
            if error is None:
                send("done", {"image": data_url(done.result())})
            else:
                send("error", {"error": str(error)})

        future.add_done_callback(finished)

        async def lines():
            try:
                yield _event("queued", {"ahead": max(ahead, 0)})
                while True:
                    kind, data = await events.get()
                    yield _event(kind, data)
                    if kind in ("done", "error"):
                        return
            finally:
                cancelled.set()  # a client that left (or a finished job) stops the work

        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    app = Starlette(routes=[Route("/", index), Route("/api/info", info),
                            Route("/api/generate", generate, methods=["POST"]),
                            Route("/api/stream", stream, methods=["POST"])],
                    exception_handlers={BadRequest: lambda request, error: _bad(str(error))})
    app.state.worker = worker
    return app


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
