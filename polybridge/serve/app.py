"""The ASGI app of ``polybridge serve``: a JSON API (FastAPI), its OpenAPI docs, the page, health and metrics.

Requests are checked on the event loop (fields, limits, loaded languages, the router's plan) and queued; the model
runs in the :class:`~polybridge.serve.batcher.Batcher`'s one worker thread, which batches requests across languages.
The event loop never runs the model: it routes prompts (microseconds once the detector is warm, which startup does)
and awaits futures. Routing on the loop uses a router of its own, configured as the pipeline's, so the worker's and the
loop's routers share no mutable state.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from polybridge.errors import PolyBridgeError
from polybridge.serve.batcher import Batcher, BatcherStopped, GenerateJob, GenerateResult, QueueFull
from polybridge.serve.engine import PipelineRunner
from polybridge.serve.metrics import Metrics

log = logging.getLogger("polybridge.serve")

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_IMAGES = 4
MAX_SEED = 2**32 - 1
MAX_PLUGINS = 8
MAX_BODY_BYTES = 1024 * 1024  # a 2000-character prompt is at most 8 kB; longer ones are told so by name


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and queues."""

    max_batch: int = 16
    max_wait_ms: float = 50.0
    max_queue: int = 256
    max_size_factor: int = 4  # sizes up to this many times the backbone's own


class GenerateRequest(BaseModel):
    """What to draw. Images of one request differ by seed: image i uses seed + i."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS, description="the prompt, in any registered language or mixed")
    language: Optional[str] = Field(None, description="the prompt's language code; null: the router decides")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="in the prompt's language")
    english_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                description="English text the backbone reads beside a native prompt")
    steps: int = Field(25, ge=1, le=MAX_STEPS, description="denoising steps")
    guidance: float = Field(7.5, ge=0, le=MAX_GUIDANCE, description="classifier-free guidance scale")
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="null: a random seed (returned)")
    size: Optional[int] = Field(None, ge=1, description="image side in pixels; null: the backbone's")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="images")
    plugins: list[str] = Field(default_factory=list, max_length=MAX_PLUGINS,
                               description="plugin names from the registry (GET /api/info lists them)")


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message, "field": field}``."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _router_like(pipe: Any) -> Any:
    """A router configured as the pipeline's (same languages, targets, threshold), with its own caches."""
    from polybridge.router import Router

    base = pipe.router
    if getattr(pipe, "registry", None) is not None:
        return Router.from_registry(pipe.registry, routes=base.routes, untrained=sorted(base.untrained))
    return Router(base.languages, backbone_language=base.backbone_language, fallback_language=base.fallback_language,
                  threshold=base.threshold, routes=base.routes, untrained=sorted(base.untrained))


def served_plugins(pipe: Any) -> dict[str, Any]:
    """The registry's plugins loaded into ``pipe`` for requests to choose (see
    :func:`polybridge.plugins.use.load_served_plugins`): LoRAs whose adapter is in the UNet, Textual Inversions whose
    token the tokenizer knows."""
    registry = getattr(pipe, "registry", None)
    specs = getattr(registry, "plugins", None) or {}
    if not specs:
        return {}
    from polybridge.plugins.lora import adapter_names_of

    adapters, vocab = set(adapter_names_of(pipe.unet)), pipe.tokenizer.get_vocab()
    return {name: spec for name, spec in sorted(specs.items())
            if (spec.kind == "lora" and name in adapters)
            or (spec.kind == "textual_inversion" and spec.token is not None and spec.token in vocab)}


class Service:
    """What the endpoints share: the pipeline's facts, the loop's router, the batcher, the metrics."""

    def __init__(self, pipe: Any, options: ServeOptions, runner: Any = None):
        self.pipe = pipe
        self.options = options
        self.router = _router_like(pipe)
        self.metrics = Metrics()
        self.batcher = Batcher(runner or PipelineRunner(pipe), max_batch=options.max_batch,
                               max_wait_ms=options.max_wait_ms, max_queue=options.max_queue,
                               on_batch=self.metrics.batch)
        self.languages = dict(pipe.languages)
        self.backbone_language = pipe.config.backbone_language
        sample = pipe.unet.config.sample_size
        self.scale = pipe.vae_scale_factor
        self.default_size = (sample if isinstance(sample, int) else sample[0]) * self.scale
        self.max_size = self.default_size * options.max_size_factor
        self.plugins = served_plugins(pipe)

    def info(self) -> dict[str, Any]:
        registry = getattr(self.pipe, "registry", None)
        languages = []
        for code, state in self.languages.items():
            entry = registry.languages.get(code) if registry is not None else None
            languages.append({"code": code, "name": getattr(entry, "name", code),
                              "native_name": getattr(entry, "native_name", None) or getattr(entry, "name", code),
                              "route": state.route, "trained": state.trained})
        plugins = [{"name": name, "kind": spec.kind, "description": spec.description,
                    **({"token": spec.token} if spec.kind == "textual_inversion" else {"scale": spec.scale})}
                   for name, spec in self.plugins.items()]
        return {"backbone_language": self.backbone_language, "languages": languages, "plugins": plugins,
                "defaults": {"steps": 25, "guidance": 7.5, "size": self.default_size, "n": 1},
                "limits": {"prompt_chars": MAX_PROMPT_CHARS, "steps": MAX_STEPS, "guidance": MAX_GUIDANCE,
                           "images": min(MAX_IMAGES, self.options.max_batch), "seed": MAX_SEED,
                           "size": {"min": self.scale, "max": self.max_size, "multiple_of": self.scale}},
                "batching": {"max_batch": self.options.max_batch, "max_wait_ms": self.options.max_wait_ms,
                             "max_queue": self.options.max_queue}}

    def plan(self, prompt: str) -> Any:
        return self.router.plan(prompt)

    def job(self, req: Any) -> tuple[GenerateJob, Any]:
        """The job a request asks for, and the router's plan (None with a language); ApiError naming the field."""
        if not req.prompt.strip():
            raise ApiError(422, "prompt: empty; say what to draw", "prompt")
        if req.n > self.options.max_batch:
            raise ApiError(422, f"n: at most {self.options.max_batch} images a request (--max-batch)", "n")
        if req.size is not None and (req.size % self.scale or req.size > self.max_size):
            raise ApiError(422, f"size: {req.size} is not a multiple of {self.scale} from {self.scale} to "
                                f"{self.max_size}", "size")
        if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
            raise ApiError(422, f"seed: seed + n - 1 must be at most {MAX_SEED}", "seed")
        lora, tokens = self._plugins(req.plugins)
        plan = None
        if req.language is not None:
            if req.language not in self.languages:
                raise ApiError(422, f"language: {req.language!r} is not loaded in this server; loaded: "
                                    f"{', '.join(self.languages)} (or null: the router decides)", "language")
            if req.english_prompt and self.languages[req.language].route == "backbone":
                raise ApiError(422, f"english_prompt: {req.language!r} prompts go to the backbone's text encoder "
                                    "themselves; put the English text in the prompt", "english_prompt")
        else:
            for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
                p = self.plan(text)
                plan = p if field == "prompt" else plan
                for span in p.problems():
                    raise ApiError(422, f"{field}: {span.text!r} is {span.language} ({span.how}), which this server "
                                        f"cannot run ({span.target}); loaded: {', '.join(self.languages)}; or pass "
                                        "language", field)
        seed = random.randint(0, MAX_SEED - req.n + 1) if req.seed is None else req.seed
        prompt, english = req.prompt, req.english_prompt
        if tokens:  # a Textual Inversion's token goes where English words go: the English part, or an English prompt
            if req.language is not None and self.languages[req.language].route == "backbone":
                prompt = " ".join([prompt, *tokens])
            else:
                english = " ".join([english, *tokens]).strip()
        job = GenerateJob(prompt=prompt, language=req.language, negative_prompt=req.negative_prompt,
                          english_prompt=english, steps=req.steps, guidance=float(req.guidance),
                          seed=seed, size=req.size, n=req.n, lora=lora)
        return job, plan

    def _plugins(self, names: list[str]) -> tuple[str | None, list[str]]:
        """A request's plugins: its LoRA (one at most: each row runs one adapter) and its Textual Inversion tokens."""
        for name in names:
            if name not in self.plugins:
                offered = ", ".join(self.plugins) or "none (the registry names no plugins this server applies)"
                raise ApiError(422, f"plugins: unknown plugin {name!r}; this server offers: {offered}", "plugins")
        loras = [n for n in dict.fromkeys(names) if self.plugins[n].kind == "lora"]
        if len(loras) > 1:
            raise ApiError(422, f"plugins: {', '.join(loras)}: one LoRA a request (each image runs one adapter)",
                           "plugins")
        tokens = [self.plugins[n].token for n in dict.fromkeys(names) if self.plugins[n].kind == "textual_inversion"]
        return (loras[0] if loras else None), tokens

    async def run(self, job: GenerateJob, request: Any) -> GenerateResult | None:
        """The job's result; None when the client went away first (the job is dropped if it has not started)."""
        started = time.monotonic()
        try:
            future = self.batcher.submit(job)
        except QueueFull as exc:
            self.metrics.request("rejected")
            raise ApiError(503, str(exc), None, {"Retry-After": str(exc.retry_after)}) from None
        except BatcherStopped as exc:
            self.metrics.request("rejected")
            raise ApiError(503, str(exc), None, {"Retry-After": "5"}) from None
        waiting = asyncio.wrap_future(future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.2)
            if done:
                break
            if await request.is_disconnected():
                future.cancel()
                self.metrics.request("disconnected")
                return None
        try:
            result = waiting.result()
        except PolyBridgeError as exc:
            raise ApiError(422, str(exc)) from None
        except Exception:
            self.metrics.request("error")
            log.exception("generation failed")
            raise ApiError(500, "generation failed: an internal error (see the server's log)") from None
        self.metrics.request("ok", result.language, time.monotonic() - started, len(result.images))
        return result


def _error_response(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                    detail: Any = None) -> Any:
    body: dict[str, Any] = {"error": message, "field": field}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(pipe: Any, options: ServeOptions | None = None, runner: Any = None) -> Any:
    """The FastAPI app serving ``pipe``. ``runner(jobs) -> results`` replaces the pipeline call (tests)."""
    options = options or ServeOptions()
    service = Service(pipe, options, runner)

    @asynccontextmanager
    async def lifespan(app: Any):
        await asyncio.to_thread(service.plan, "warm up the detector, la détection, die Erkennung")
        service.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.batcher.stop)

    app = FastAPI(title="polybridge", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="One frozen English text-to-image backbone, many native-language branches. "
                              "Requests in different languages are batched into one denoising loop.")
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Any:
        if exc.status == 422:
            service.metrics.request("invalid")
        return _error_response(exc.status, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = ".".join(loc) or None
        service.metrics.request("invalid")
        if first.get("type") == "json_invalid":
            return _error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        if first.get("type") == "extra_forbidden":
            return _error_response(422, f"{field}: unknown field", field, detail=jsonable_encoder(errors))
        if first.get("type") == "missing":
            return _error_response(422, f"{field}: required", field, detail=jsonable_encoder(errors))
        return _error_response(422, f"{field or 'body'}: {first['msg']}", field, detail=jsonable_encoder(errors))

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            service.metrics.request("invalid")
            return _error_response(413, f"the body is {length} bytes; at most {MAX_BODY_BYTES}")
        return await call_next(request)

    def _generated(job: GenerateJob, plan: Any, result: GenerateResult) -> dict[str, Any]:
        return {"language": result.language, "seed": job.seed, "seeds": result.seeds, "steps": job.steps,
                "guidance": job.guidance, "size": job.size or service.default_size,
                "plan": None if plan is None else plan.to_dict(),
                "images": [base64.b64encode(png).decode("ascii") for png in result.images],
                "batch": {"rows": result.batch_rows, "requests": result.batch_jobs,
                          "seconds": result.run_seconds}}

    @app.post("/api/generate", summary="Generate images (PNG, base64 in JSON)")
    async def generate(req: GenerateRequest, request: Request) -> Any:
        """Images as base64 PNG; ``plan`` is the router's plan when ``language`` is null."""
        job, plan = service.job(req)
        result = await service.run(job, request)
        if result is None:
            return Response(status_code=499)
        return _generated(job, plan, result)

    @app.post("/api/generate.png", summary="Generate images as one PNG (n images side by side)",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def generate_png(req: GenerateRequest, request: Request) -> Any:
        job, _ = service.job(req)
        result = await service.run(job, request)
        if result is None:
            return Response(status_code=499)
        png = result.images[0] if len(result.images) == 1 else await asyncio.to_thread(_strip, result.images)
        return Response(png, media_type="image/png", headers={"X-Seed": str(job.seed),
                                                              "X-Language": result.language})

    @app.post("/api/route", summary="The router's plan of a prompt: spans, languages, where each goes")
    async def route(req: RouteRequest) -> Any:
        service.metrics.route()
        return service.plan(req.prompt).to_dict()

    @app.get("/api/info", summary="Loaded languages, plugins, defaults and limits")
    async def info() -> Any:
        return service.info()

    @app.get("/health", summary="Whether the model worker is up")
    async def health() -> Any:
        alive = service.batcher.alive
        body = {"status": "ok" if alive else "down", "worker": alive, "queue_depth": service.batcher.depth}
        return body if alive else _error_response(503, "the model worker is not running")

    @app.get("/metrics", summary="Requests, batch sizes, queue depth, latency")
    async def metrics() -> Any:
        return service.metrics.snapshot(service.batcher.depth, service.batcher.running, options.max_queue,
                                        options.max_batch)

    static = resources.files("polybridge.serve") / "static"

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> Any:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _mount_docs(app)
    return app


def _strip(images: list[bytes]) -> bytes:
    """PNG images side by side, as one PNG."""
    import io

    import PIL.Image

    from polybridge.serve.engine import png_bytes

    opened = [PIL.Image.open(io.BytesIO(png)) for png in images]
    strip = PIL.Image.new("RGB", (sum(im.width for im in opened), max(im.height for im in opened)))
    x = 0
    for im in opened:
        strip.paste(im, (x, 0))
        x += im.width
    return png_bytes(strip)


def _mount_docs(app: Any) -> None:
    """``/docs``: Swagger UI from the ``swagger-ui-bundle`` package (offline); FastAPI's default if it is missing."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        import swagger_ui_bundle

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
        urls = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js", "swagger_css_url": "/docs-assets/swagger-ui.css",
                "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    except ImportError:
        urls = {}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="polybridge API", **urls)


def _version() -> str:
    from polybridge import __version__

    return __version__
