"""Running a batch of jobs as one :class:`~polybridge.pipeline.PolyBridgePipeline` call (in the worker thread).

Each job's rows keep their own language (``language`` as a list, ``None`` where the router decides) and their own
generators (``seed + i`` for image ``i``), so each job's images are those the job would get alone::

    pipe(job.prompt, language=job.language, negative_prompt=job.negative_prompt, english_prompt=job.english_prompt,
         num_inference_steps=job.steps, guidance_scale=job.guidance, height=job.size, width=job.size,
         generator=[torch.Generator().manual_seed(job.seed + i) for i in range(job.n)], num_images_per_prompt=job.n,
         lora_adapters=[job.lora])  # when LoRA plugins are loaded
"""

from __future__ import annotations

import io
import time
from typing import Any, Sequence

from polybridge.errors import PolyBridgeValueError
from polybridge.serve.batcher import GenerateJob, GenerateResult


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class PipelineRunner:
    """``runner(jobs)``: the jobs' images from one pipeline call. Every job must have the same :attr:`~GenerateJob.key`."""

    def __init__(self, pipe: Any):
        from polybridge.plugins.lora import adapter_names_of

        self.pipe = pipe
        self.loras = adapter_names_of(pipe.unet)

    def arguments(self, jobs: Sequence[GenerateJob]) -> dict[str, Any]:
        """The pipeline call's keyword arguments for ``jobs``, one row per image."""
        import torch

        keys = {job.key for job in jobs}
        if len(keys) != 1:
            raise PolyBridgeValueError(f"jobs of one call must share steps, guidance and size, got {keys}")
        rows = [(job, i) for job in jobs for i in range(job.n)]
        first = jobs[0]
        # with LoRAs loaded, every call names each row's adapter (None: none), so no row runs another's
        loras = dict(lora_adapters=[job.lora for job, _ in rows]) if self.loras else {}
        return dict(prompt=[job.prompt for job, _ in rows], language=[job.language for job, _ in rows], **loras,
                    negative_prompt=[job.negative_prompt for job, _ in rows],
                    english_prompt=[job.english_prompt for job, _ in rows],
                    generator=[torch.Generator().manual_seed(job.seed + i) for job, i in rows],
                    num_inference_steps=first.steps, guidance_scale=first.guidance, height=first.size,
                    width=first.size)

    def __call__(self, jobs: Sequence[GenerateJob]) -> list[GenerateResult]:
        started = time.monotonic()
        out = self.pipe(**self.arguments(jobs))
        seconds = time.monotonic() - started
        rows = sum(job.n for job in jobs)
        results, at = [], 0
        for job in jobs:
            images = [png_bytes(im) for im in out.images[at:at + job.n]]
            results.append(GenerateResult(images=images, language=out.languages[at], seeds=[job.seed + i for i in range(job.n)],
                                          batch_rows=rows, batch_jobs=len(jobs), run_seconds=round(seconds, 4)))
            at += job.n
        return results
