"""``polybridge serve``: requests in different languages share one pipeline call and each gets what it would get
alone; the queue is bounded; bad requests get a 4xx naming the field; health, metrics, docs and the page offline.
On the committed embedded default (zh, ja, en) with few steps, and fake runners for the queue's behaviour."""

from __future__ import annotations

import asyncio
import io
import threading
import warnings

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient

from polybridge.cli import main
from polybridge.pipeline import PolyBridgePipeline
from polybridge.serve.app import Service, ServeOptions, create_app
from polybridge.serve.batcher import Batcher, GenerateJob, GenerateResult

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = PolyBridgePipeline.from_registry(languages=["en", "zh", "ja"])
    p.set_progress_bar_config(disable=True)
    return p


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def alone(pipe, job: dict) -> list[np.ndarray]:
    """The request's images from a pipeline call of its own."""
    n, seed = job.get("n", 1), job["seed"]
    out = pipe(job["prompt"], language=job.get("language"), negative_prompt=job.get("negative_prompt", ""),
               english_prompt=job.get("english_prompt", ""), num_inference_steps=job["steps"],
               guidance_scale=job.get("guidance", 7.5), num_images_per_prompt=n,
               generator=[torch.Generator().manual_seed(seed + i) for i in range(n)])
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in out.images]


async def _post_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/api/generate", json=b) for b in bodies))


def test_language_list_in_one_call_equals_each_prompt_alone(pipe):
    prompts = ["左边有一个红色的灯笼", "a red circle on the left", "左に赤い鳥居", "a blue square, 红色的灯笼"]
    codes = ["zh", "en", None, None]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = pipe(prompts, language=codes, num_inference_steps=STEPS, generator=gens, output_type="latent")
    assert out.languages == ["zh", "en", "ja", "en+zh"]
    for i, (p, code) in enumerate(zip(prompts, codes)):
        single = pipe(p, language=code, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(i),
                      output_type="latent").images
        assert torch.allclose(out.images[i:i + 1], single, rtol=1e-4, atol=1e-5), p
    with pytest.raises(ValueError, match="language: 1 codes for 2 prompts"):
        pipe(["a", "b"], language=["en"], num_inference_steps=1)


def test_concurrent_requests_in_four_languages_share_one_call_and_equal_each_alone(pipe):
    app = create_app(pipe, ServeOptions(max_batch=5, max_wait_ms=3000))
    bodies = [{"prompt": "左边有一个红色的灯笼", "steps": STEPS, "seed": 3, "n": 2},
              {"prompt": "a red circle on the left", "language": "en", "steps": STEPS, "seed": 5},
              {"prompt": "左に赤い鳥居", "language": "ja", "steps": STEPS, "seed": 7, "negative_prompt": "青い"},
              {"prompt": "a blue square, 红色的灯笼", "steps": STEPS, "seed": 9},
              # another step count cannot share that call: it runs in a second one
              {"prompt": "在黑色背景上有一个蓝色的圆", "language": "zh", "steps": STEPS + 1, "seed": 11}]
    service: Service = app.state.service
    service.batcher.start()
    try:
        responses = asyncio.run(_post_all(app, bodies))
    finally:
        service.batcher.stop()
    for r in responses:
        assert r.status_code == 200, r.text
    outs = [r.json() for r in responses]
    assert [o["language"] for o in outs] == ["zh", "en", "ja", "en+zh", "zh"]
    assert [o["batch"]["requests"] for o in outs] == [4, 4, 4, 4, 1]
    assert [o["batch"]["rows"] for o in outs] == [5, 5, 5, 5, 1]
    assert outs[0]["plan"]["label"] == "zh" and outs[1]["plan"] is None and outs[0]["seeds"] == [3, 4]
    for body, out in zip(bodies, outs):
        got = [pixels(__import__("base64").b64decode(png)) for png in out["images"]]
        for a, b in zip(got, alone(pipe, body)):
            assert np.abs(a - b).max() <= 1, body  # equal up to float rounding of batched kernels
    metrics = service.metrics.snapshot(0, 0, 1, 5)
    assert metrics["batches"]["count"] == 2 and metrics["batches"]["rows_histogram"] == {"1": 1, "5": 1}
    assert metrics["requests"]["ok"] == 5 and metrics["latency_seconds"]["p95"] is not None


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServeOptions(max_batch=4, max_wait_ms=10))) as c:
        yield c


@pytest.mark.parametrize("body, status, field, says", [
    ({"prompt": "x", "steps": 0}, 422, "steps", "greater than or equal to 1"),
    ({"prompt": "x", "steps": 101}, 422, "steps", "less than or equal to 100"),
    ({"prompt": "x", "guidance": "much"}, 422, "guidance", "number"),
    ({"prompt": "x", "bogus": 1}, 422, "bogus", "unknown field"),
    ({"steps": 2}, 422, "prompt", "required"),
    ({"prompt": "灯" * 100_000}, 422, "prompt", "at most 2000 characters"),
    ({"prompt": "  "}, 422, "prompt", "empty"),
    ({"prompt": "x", "size": 30}, 422, "size", "multiple of"),
    ({"prompt": "x", "size": 4096}, 422, "size", "multiple of"),
    ({"prompt": "x", "n": 9}, 422, "n", "less than or equal to 4"),
    ({"prompt": "x", "language": "hi"}, 422, "language", "not loaded in this server; loaded: en, zh, ja"),
    ({"prompt": "x", "language": "en", "english_prompt": "y"}, 422, "english_prompt", "backbone"),
    ({"prompt": "красный фонарь"}, 422, "prompt", "ru"),
    ({"prompt": "x", "plugins": ["ink-lora"]}, 422, "plugins", "unknown plugin 'ink-lora'; this server offers: none"),
])
def test_bad_requests_get_a_4xx_naming_the_field(client, body, status, field, says):
    r = client.post("/api/generate", json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and says in r.json()["error"], r.json()


def test_malformed_json_and_the_server_keeps_serving(client):
    r = client.post("/api/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/generate", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/api/generate.png", json={"prompt": "左边有一个红色的灯笼", "steps": 2, "seed": 0})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-language"] == "zh"
    assert PIL.Image.open(io.BytesIO(r.content)).size == (32, 32)
    assert client.get("/health").json() == {"status": "ok", "worker": True, "queue_depth": 0}
    metrics = client.get("/metrics").json()
    assert metrics["requests"]["invalid"] >= 2 and metrics["requests"]["ok"] >= 1
    assert set(metrics) >= {"requests", "requests_by_language", "queue", "batches", "latency_seconds"}


def test_route_info_docs_and_page_offline(client):
    plan = client.post("/api/route", json={"prompt": "a red gate, 赤い鳥居"}).json()
    assert [(s["language"], s["target"]) for s in plan["spans"]] == [("en", "backbone"), ("ja", "branch")]
    assert plan["branch_texts"] == {"ja": "赤い鳥居"}
    info = client.get("/api/info").json()
    assert [lang["code"] for lang in info["languages"]] == ["en", "zh", "ja"] and info["plugins"] == []
    assert "/api/generate" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = client.get("/").text
    assert "/static/app.js" in page and "http://" not in page and "https://" not in page
    for asset in ("app.js", "style.css"):
        text = client.get(f"/static/{asset}").text
        assert "http://" not in text and "https://" not in text


class BlockingRunner:
    """A fake model: each call waits for ``release``; records the jobs of each call."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def __call__(self, jobs):
        self.calls.append([j.prompt for j in jobs])
        self.release.wait(10)
        if any(j.prompt == "boom" for j in jobs):
            raise ValueError("boom")
        return [GenerateResult([b"png"], "en", [j.seed], len(jobs), len(jobs), 0.0) for j in jobs]


def test_full_queue_answers_503_with_retry_after(pipe):
    runner = BlockingRunner()
    app = create_app(pipe, ServeOptions(max_batch=1, max_wait_ms=0, max_queue=2), runner=runner)

    async def flood():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async def until(condition):
                for _ in range(1000):
                    if condition():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("the server did not get there in 10 s")

            post = lambda i: asyncio.create_task(client.post("/api/generate", json={"prompt": f"p{i}", "seed": i}))  # noqa: E731
            tasks = [post(0)]
            await until(lambda: runner.calls)  # one running
            tasks += [post(1), post(2)]
            await until(lambda: app.state.service.batcher.depth == 2)  # two waiting
            full = await client.post("/api/generate", json={"prompt": "one too many"})
            runner.release.set()
            return full, await asyncio.gather(*tasks)

    app.state.service.batcher.start()
    try:
        full, done = asyncio.run(flood())
    finally:
        app.state.service.batcher.stop()
    assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1 and "queue is full" in full.json()["error"]
    assert [r.status_code for r in done] == [200, 200, 200]  # nobody else lost
    assert app.state.service.metrics.requests["rejected"] == 1


def test_a_client_that_goes_away_is_dropped_and_a_failing_job_fails_alone(pipe):
    runner = BlockingRunner()
    service = Service(pipe, ServeOptions(max_batch=4, max_wait_ms=0), runner=runner)

    class Gone:
        async def is_disconnected(self):
            return True

    async def scenario():
        first = service.batcher.submit(GenerateJob("running"))
        for _ in range(1000):
            if runner.calls:
                break
            await asyncio.sleep(0.01)
        gone = await service.run(GenerateJob("gone"), Gone())  # queued behind the running call; its client left
        runner.release.set()
        await asyncio.wrap_future(first)
        return gone

    service.batcher.start()
    try:
        assert asyncio.run(scenario()) is None
        jobs = [service.batcher.submit(GenerateJob(p, seed=i)) for i, p in enumerate(["ok", "boom", "fine"])]
        assert jobs[0].result(10).seeds == [0] and jobs[2].result(10).seeds == [2]
        with pytest.raises(ValueError, match="boom"):
            jobs[1].result(10)
    finally:
        service.batcher.stop()
    assert ["gone"] not in runner.calls and service.metrics.requests["disconnected"] == 1
    assert runner.calls[1] == ["ok", "boom", "fine"] and runner.calls[2:] == [["ok"], ["boom"], ["fine"]]


def test_batcher_groups_by_key_in_order():
    seen = []
    batcher = Batcher(lambda jobs: seen.append([(j.prompt, j.steps) for j in jobs]) or
                      [GenerateResult([], "en", [], 0, 0, 0.0)] * len(jobs), max_batch=3, max_wait_ms=200)
    futures = [batcher.submit(GenerateJob(p, steps=s, n=n)) for p, s, n in
               [("a", 2, 1), ("b", 3, 1), ("c", 2, 2), ("d", 2, 1), ("e", 3, 1)]]
    batcher.start()
    try:
        for f in futures:
            f.result(10)
    finally:
        batcher.stop()
    assert seen == [[("a", 2), ("c", 2)], [("b", 3), ("e", 3)], [("d", 2)]]


def test_cli_serve_refuses_unknown_language_in_one_line(capsys):
    assert main(["serve", "--languages", "xx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "xx" in err[0]
