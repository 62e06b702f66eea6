"""`vqdiff serve`'s HTTP API, in process (Starlette's test client) and through a real uvicorn server for the
streaming, the queue and a client that leaves."""

import asyncio
import io
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="vqdiff serve needs the serve extra: pip install 'vqdiff[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
from starlette.testclient import TestClient  # noqa: E402

from vqdiff.images import make_grid  # noqa: E402
from vqdiff.pipeline import load_pipeline  # noqa: E402
from vqdiff.serve.app import create_app  # noqa: E402

from vqdiff.serve.live import live_server  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format_v1"
PROMPT = "a red circle"  # the fixtures read 8 text tokens


@pytest.fixture(scope="module")
def vq():
    return load_pipeline(FIXTURES / "vq_pipeline")


@pytest.fixture(scope="module")
def gaussian():
    return load_pipeline(FIXTURES / "latent_ddpm_pipeline")


@pytest.fixture(scope="module")
def client(vq):
    with TestClient(create_app(vq, max_batch=4)) as test_client:
        yield test_client


def png(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    image.load()
    return image


def test_info_describes_the_model(client, vq):
    info = client.get("/api/info").json()
    assert info["type"] == "VQ-Diffusion" and info["parameters"] == sum(p.numel() for p in vq.model.parameters())
    assert info["token_grid"] == list(vq.grid) and info["codes"] == vq.tokenizer.num_embeddings
    assert info["defaults"]["steps"] == vq.cfg.sample.steps and info["defaults"]["truncation_rate"] == 0.86
    assert info["limits"]["max_batch"] == 4 and info["limits"]["max_steps"] == vq.diffusion.num_timesteps
    assert info["choices"]["strategy"] == ["ancestral", "purity"]
    page = client.get("/").text
    assert '<button id="generate"' in page and "/api/stream" in page


def test_generate_answers_the_grid_that_the_pipeline_draws(client, vq):
    """The server adds nothing: its PNG is the pipeline's images for the same prompt, seed and options."""
    body = {"prompt": PROMPT, "n": 3, "seed": 7, "steps": 3, "guidance_scale": 1.5, "truncation_rate": 0.9,
            "strategy": "purity"}
    response = client.post("/api/generate", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    images = vq([PROMPT] * 3, torch.Generator().manual_seed(7), progress=False, steps=3, guidance_scale=1.5,
                truncation_rate=0.9, strategy="purity")
    assert png(response.content).tobytes() == make_grid(images, nrow=3).tobytes()


@pytest.mark.parametrize("body, field", [
    ({}, "prompt: missing"),
    ({"prompt": "   "}, "prompt: missing or empty"),
    ({"prompt": "circle " * 40}, "prompt: 42 tokens"),
    ({"prompt": PROMPT, "n": 5}, "n: 5 is out of range; allowed: 1 to 4"),
    ({"prompt": PROMPT, "n": "2"}, "n: '2' is not an integer"),
    ({"prompt": PROMPT, "steps": 0}, "steps: 0 is out of range"),
    ({"prompt": PROMPT, "steps": 11}, "steps: 11 is out of range; allowed: 1 to 10"),
    ({"prompt": PROMPT, "strategy": "purty"}, "strategy: 'purty' is not one of ['ancestral', 'purity']"),
    ({"prompt": PROMPT, "truncation_rate": 0}, "truncation_rate: 0 is out of range; allowed: (0, 1]"),
    ({"prompt": PROMPT, "guidance_scale": float("nan")}, "guidance_scale: nan is not a finite number"),
    ({"prompt": PROMPT, "sampler": "ddim"}, "sampler: not an option of this VQ-Diffusion model"),
    ({"prompt": PROMPT, "path": "/etc/passwd"}, "path: unknown field"),
    ([PROMPT], "must be a JSON object"),
])
def test_bad_input_gets_400_naming_the_field(client, body, field):
    for endpoint in ("/api/generate", "/api/stream"):
        response = client.post(endpoint, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and field in response.json()["error"], (endpoint, response.text)
    response = client.post("/api/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_a_gaussian_model_refuses_vq_options(gaussian):
    with TestClient(create_app(gaussian)) as test_client:
        info = test_client.get("/api/info").json()
        assert info["type"] == "Gaussian" and info["choices"] == {"sampler": ["ddpm", "ddim"]}
        response = test_client.post("/api/generate", json={"prompt": PROMPT, "truncation_rate": 0.8})
        assert response.status_code == 400
        assert "truncation_rate: not an option of this Gaussian model" in response.json()["error"]
        ok = test_client.post("/api/generate", json={"prompt": PROMPT, "n": 2, "steps": 3, "sampler": "ddim"})
        assert ok.status_code == 200 and png(ok.content).size[0] > 2 * gaussian.cfg.data.size


def events(lines) -> list[tuple[str, dict]]:
    found, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            found.append((kind, json.loads(line[len("data: "):])))
    return found


def test_the_stream_sends_frames_then_the_same_grid(vq):
    app = create_app(vq, max_batch=4)
    body = {"prompt": PROMPT, "n": 2, "seed": 3, "steps": 10}
    with live_server(app) as url:
        with httpx.stream("POST", url + "/api/stream", json=body, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            got = events(response.iter_lines())
        grid = httpx.post(url + "/api/generate", json=body, timeout=60).content
    kinds = [kind for kind, _ in got]
    assert kinds[0] == "queued" and kinds[1] == "frame" and kinds[-1] == "done" and set(kinds) <= {
        "queued", "frame", "done"}
    frames = [data for kind, data in got if kind == "frame"]
    assert frames[0]["step"] == 1 and all(f["total"] == 10 for f in frames)
    final = got[-1][1]["image"]
    assert final.startswith("data:image/png;base64,")
    import base64
    assert base64.b64decode(final.split(",", 1)[1]) == grid


def test_four_clients_at_once_all_get_their_images(vq):
    """Concurrent requests queue on the one model: each gets the grid its own seed gives alone."""
    app = create_app(vq, max_batch=4)
    bodies = [{"prompt": PROMPT, "n": 2, "seed": seed, "steps": 4} for seed in range(4)]

    async def together(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as session:
            return await asyncio.gather(*(session.post("/api/generate", json=body) for body in bodies))

    with live_server(app) as url:
        answers = asyncio.run(together(url))
        alone = [httpx.post(url + "/api/generate", json=body, timeout=60).content for body in bodies]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.content for a in answers] == alone


def test_a_client_that_leaves_cancels_its_job(vq):
    app = create_app(vq, max_batch=4)
    worker = app.state.worker
    body = {"prompt": PROMPT, "n": 4, "steps": 10}
    with live_server(app) as url:
        with httpx.stream("POST", url + "/api/stream", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: frame"):
                    break  # leave after the first frame
        deadline = time.monotonic() + 30
        while worker.cancelled_jobs < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.cancelled_jobs == 1 and worker.finished_jobs == 0
        # the server goes on serving
        assert httpx.post(url + "/api/generate", json={"prompt": PROMPT, "steps": 2}, timeout=60).status_code == 200
    assert worker.finished_jobs == 1


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_fifty_requests_leave_the_memory_where_the_first_left_it(client):
    body = {"prompt": PROMPT, "n": 4, "steps": 2}
    assert client.post("/api/generate", json=body).status_code == 200
    first = resident_bytes()
    for seed in range(50):
        assert client.post("/api/generate", json={**body, "seed": seed}).status_code == 200
    assert resident_bytes() - first < 32 * 2**20


def test_the_server_is_only_for_text_to_image_models():
    from vqdiff.config import ConfigError
    from vqdiff.pipeline import DDPMPipeline
    with pytest.raises(ConfigError, match="needs a text-to-image model"):
        create_app(DDPMPipeline.from_pretrained(FIXTURES / "scurve_run"))


def test_bench_serve_prints_both_sides(capsys):
    import runpy
    bench = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"))
    bench["main"](["--model", str(FIXTURES / "vq_pipeline"), "--prompt", PROMPT, "--n", "2", "--steps", "3",
                   "--repeats", "1"])
    table = capsys.readouterr().out
    for row in ("| pipe(...) |", "| POST /api/generate |", "| stream: first frame |", "| server overhead (generate) |"):
        assert row in table
