"""``polybridge serve``: one backbone serving every loaded language to many users, with a page.

- :mod:`~polybridge.serve.app`: the ASGI app (FastAPI): the JSON API, OpenAPI docs, the page, health and metrics;
- :mod:`~polybridge.serve.batcher`: the bounded queue and the one worker thread that runs the model, batching
  requests in different languages into one pipeline call;
- :mod:`~polybridge.serve.engine`: a batch of requests as one :class:`~polybridge.pipeline.PolyBridgePipeline` call;
- :mod:`~polybridge.serve.metrics`: what ``/metrics`` reports;
- ``static/``: the page (plain HTML, CSS and JavaScript, no CDN: it works offline).
"""
