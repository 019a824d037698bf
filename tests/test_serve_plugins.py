"""``polybridge serve`` with the registry's plugins: LoRA and Textual Inversion plugins chosen request by request,
rows with different LoRAs (or none) sharing one pipeline call, each image what the stock path gives alone; the
kinds a server does not apply are said at start; bad plugin requests get a 4xx naming the field. Tiny components."""

from __future__ import annotations

import asyncio
import base64
import io
import warnings

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from plugin_fixtures import make_controlnet, make_lora, make_ti
from tiny_components import get_dummy_components, native_encoder, perturb_, write_registry

from polybridge.branches import BDMBranch
from polybridge.pipeline import PolyBridgePipeline
from polybridge.plugins.use import load_served_plugins, use_plugins
from polybridge.registry import load_registry
from polybridge.serve.app import ServeOptions, create_app

pytest.importorskip("peft")

STEPS = 2


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("servereg")
    c = get_dummy_components()
    branch = perturb_(BDMBranch.from_unet(c["unet"], 48, encoder_name="./encoder"), seed=3)
    file = write_registry(root, c, {"zh": {"encoder": native_encoder(48), "branch": branch}})
    make_lora(c["unet"], root / "plugins" / "ink", seed=1)
    make_lora(c["unet"], root / "plugins" / "chalk", seed=2)
    make_ti(root / "plugins" / "toy.safetensors", "<toy>", vectors=2)
    make_controlnet(c["unet"]).save_pretrained(root / "plugins" / "edges")
    top = yaml.safe_load(file.read_text())
    top["plugins"] = {
        "ink": {"kind": "lora", "source": "./plugins/ink", "scale": 0.8},
        "chalk": {"kind": "lora", "source": "./plugins/chalk"},
        "toy": {"kind": "textual_inversion", "source": "./plugins/toy.safetensors", "token": "<toy>"},
        "edges": {"kind": "controlnet", "source": "./plugins/edges"},
    }
    file.write_text(yaml.safe_dump(top, sort_keys=False))
    return load_registry(file)


def _pipe(registry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = PolyBridgePipeline.from_registry(registry)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(png_b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB"), dtype=np.int16)


def _alone(registry, body: dict, loras=(), tis=()) -> np.ndarray:
    """The stock path: a fresh pipeline with just this request's plugins loaded as `polybridge generate` does."""
    pipe = _pipe(registry)
    use_plugins(pipe, registry, loras=list(loras), tis=list(tis))
    out = pipe(body["prompt"], language=body.get("language"), english_prompt=body.get("english_prompt", ""),
               num_inference_steps=STEPS, generator=torch.Generator().manual_seed(body["seed"]))
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


async def _post_all(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/api/generate", json=b) for b in bodies))


def test_rows_with_different_loras_share_one_call_and_each_equals_the_stock_path(registry):
    pipe = _pipe(registry)
    skipped = load_served_plugins(pipe, registry)
    assert set(skipped) == {"edges"} and "controlnet" in skipped["edges"]
    app = create_app(pipe, ServeOptions(max_batch=8, max_wait_ms=3000))
    bodies = [{"prompt": "红色的灯笼", "language": "zh", "steps": STEPS, "seed": 1, "plugins": ["ink"]},
              {"prompt": "红色的灯笼", "language": "zh", "steps": STEPS, "seed": 1},
              {"prompt": "a red circle", "language": "en", "steps": STEPS, "seed": 2, "plugins": ["chalk"]},
              {"prompt": "红色的灯笼", "language": "zh", "steps": STEPS, "seed": 3, "plugins": ["toy", "chalk"]}]
    service = app.state.service
    assert [p["name"] for p in service.info()["plugins"]] == ["chalk", "ink", "toy"]
    service.batcher.start()
    try:
        responses = asyncio.run(_post_all(app, bodies))
    finally:
        service.batcher.stop()
    outs = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), outs
    assert [o["batch"]["requests"] for o in outs] == [4, 4, 4, 4]  # four plugin choices, one call
    expected = [_alone(registry, bodies[0], loras=["ink"]), _alone(registry, bodies[1]),
                _alone(registry, bodies[2], loras=["chalk"]),
                _alone(registry, {**bodies[3], "english_prompt": "<toy>"}, loras=["chalk"], tis=["toy"])]
    for body, out, want in zip(bodies, outs, expected):
        assert np.abs(_pixels(out["images"][0]) - want).max() <= 1, body
    assert np.abs(expected[0] - expected[1]).max() > 1  # the LoRA changes the image: the check above can fail


@pytest.mark.parametrize("plugins, says", [
    (["edges"], "unknown plugin 'edges'; this server offers: chalk, ink, toy"),
    (["ink", "chalk"], "one LoRA a request"),
])
def test_plugin_requests_the_server_cannot_apply_get_a_422(registry, plugins, says):
    pipe = _pipe(registry)
    load_served_plugins(pipe, registry, names=["ink", "chalk", "toy"])
    from fastapi.testclient import TestClient

    with TestClient(create_app(pipe, ServeOptions(max_batch=4, max_wait_ms=10))) as client:
        r = client.post("/api/generate", json={"prompt": "x", "plugins": plugins})
    assert r.status_code == 422 and r.json()["field"] == "plugins" and says in r.json()["error"], r.json()
