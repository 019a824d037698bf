"""The synthetic world's own CLIP: the English one, for the benchmark's CLIPScore- and FID-style figures.

It is a native encoder like the others (:mod:`polybridge.embedded.native_encoders`: the same tiny CLIP, trained
the same way) in the backbone's language, kept apart from ``languages/`` because English has no native encoder;
the benchmark loads it from :data:`WORLD_CLIP_DIR` with its tokenizer inside.
"""

from __future__ import annotations

from pathlib import Path

from polybridge.embedded.native_encoders import NativeEncoderConfig, train_native_encoder

WORLD_CLIP_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "world-clip"


def build_world_clip(registry, out_dir: str | Path = WORLD_CLIP_DIR, work_dir: str | Path = "runs/native_encoders/en",
                     cfg: NativeEncoderConfig | None = None, code: str | None = None, **kwargs) -> dict:
    """The synthetic world's own CLIP, in the backbone's language (English), for CLIPScore / FID figures.

    Trained exactly as the native encoders are, with ``languages/<code>/tokenizer``; written to
    ``out_dir`` (not under ``languages/``: English has no native encoder) with the tokenizer copied
    into ``out_dir/tokenizer`` so the folder stands alone; load it with
    :class:`~polybridge.embedded.native_encoders.ContrastiveModel`.
    """
    code = code or registry.backbone().language
    tokenizer_path = registry.language(code).folder / "tokenizer"
    return train_native_encoder(registry, code, out_dir, work_dir, cfg, tokenizer_path=tokenizer_path,
                                copy_tokenizer=True, **kwargs)
