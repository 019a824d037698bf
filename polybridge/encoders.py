"""Native text encoders: a transformers text model and its tokenizer, loaded from a registry entry.

Long prompts are **chunked**, as BDM does (52-token chunks, up to 5): a prompt that does not fit in
``max_length`` tokens is split into pieces of ``max_length - <special tokens>`` tokens, each piece is
wrapped in the tokenizer's own special tokens (``<bos> ... <eos>``, ``[CLS] ... [SEP]``) and padded to
``max_length``, each chunk is encoded on its own, and the hidden states are concatenated along the
sequence: a prompt of ``n`` chunks gives ``n * max_length`` token states. Beyond ``max_chunks`` chunks
(default 5) the rest is cut off with a warning naming the language and the lengths. A prompt that fits
is encoded exactly as ``tokenizer(prompt, padding="max_length", max_length=max_length)`` would.

In a batch whose prompts need different numbers of chunks, the shorter ones are filled up with chunks
of the empty prompt and :meth:`NativeEncoder.encode_with_mask` masks those filler chunks out, so a
prompt encodes to the same states in any batch. ``""`` is a valid prompt (the unconditional one).

``hidden_layer``: ``-1`` is the model's ``last_hidden_state`` (for CLIP text models that is after the
final layer norm, as Stable Diffusion and BDM use it); any other value indexes ``hidden_states``
(``0`` = the embeddings, ``-2`` = the penultimate layer's output, "clip skip").
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from polybridge.errors import PolyBridgeFileNotFoundError, PolyBridgeOSError, PolyBridgeValueError
from polybridge.registry import RegistryError
from polybridge.weights import check_finite, short

if TYPE_CHECKING:
    from polybridge.registry import LanguageEntry

#: BDM encodes up to 5 chunks of 52 tokens; polybridge keeps the same cap by default.
DEFAULT_MAX_CHUNKS = 5

ENCODER_BUILD_HINT = "build it with `python scripts/build_encoders.py --langs {code}` or point encoder.source at a hub id"
TOKENIZER_BUILD_HINT = "build it with `polybridge tokenizer build --lang {code}` or point encoder.tokenizer at a hub id"


class NativeEncoder(torch.nn.Module):
    """A frozen native text encoder: ``encode(prompts)`` gives the token states a branch reads."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, code: str = "", name: str = "",
                 hidden_layer: int = -1, max_length: int = 64, max_chunks: int = DEFAULT_MAX_CHUNKS):
        super().__init__()
        if max_length < 1:
            raise PolyBridgeValueError(f"max_length must be at least 1, got {max_length}")
        if max_chunks < 1:
            raise PolyBridgeValueError(f"max_chunks must be at least 1, got {max_chunks}")
        self.model = model
        self.tokenizer = tokenizer
        self.code = code
        self.name = name
        self.hidden_layer = hidden_layer
        self.max_length = max_length
        self.max_chunks = max_chunks
        self._width: int | None = None
        if tokenizer.pad_token_id is None:
            raise PolyBridgeValueError(f"{code or 'native'} tokenizer {name!r} has no pad token; set one in its tokenizer_config.json")
        # The special tokens around the text ([bos] text [eos], [CLS] text [SEP], text </s>) come from the
        # tokenizer itself, so chunks are wrapped exactly as an unchunked prompt is.
        self._prefix, self._suffix = self._special_tokens()
        if len(self._prefix) + len(self._suffix) >= max_length:
            raise PolyBridgeValueError(f"max_length {max_length} leaves no room for text next to the "
                             f"{len(self._prefix) + len(self._suffix)} special tokens of {name!r}")

    @property
    def hidden_size(self) -> int:
        """The width of the states :meth:`encode` gives: what the chosen hidden state really is, read from one
        encoding (AltCLIP's last state is ``project_dim`` wide, its other hidden states ``hidden_size``)."""
        if self._width is None:
            self._width = int(self.encode([""]).shape[-1])
        return self._width

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def chunk_capacity(self) -> int:
        """Text tokens per chunk (``max_length`` less the special tokens)."""
        return self.max_length - len(self._prefix) - len(self._suffix)

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        probe = "a"
        full = self.tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"]
        body = self.tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
        for start in range(len(full) - len(body) + 1):
            if full[start:start + len(body)] == body:
                return list(full[:start]), list(full[start + len(body):])
        raise PolyBridgeValueError(f"cannot locate the text between the special tokens of tokenizer {self.name!r}")

    def chunk_ids(self, prompt: str) -> list[list[int]]:
        """The token ids of each chunk of ``prompt`` (unpadded, special tokens included); at least one."""
        body = self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        size = self.chunk_capacity
        pieces = [body[i:i + size] for i in range(0, len(body), size)] or [[]]
        if len(pieces) > self.max_chunks:
            warnings.warn(
                f"{self.code or 'native'} prompt is {len(body)} tokens; the {self.code or 'native'} encoder takes "
                f"at most {self.max_chunks} chunks of {size} tokens ({self.max_chunks * size} tokens, "
                f"max_length {self.max_length}), so the last {len(body) - self.max_chunks * size} tokens are cut off",
                stacklevel=3)
            pieces = pieces[:self.max_chunks]
        return [self._prefix + piece + self._suffix for piece in pieces]

    @torch.no_grad()
    def encode_with_mask(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token states ``(batch, chunks * max_length, hidden)`` and a ``(batch, chunks * max_length)``
        mask that is 0 on filler chunks, or ``None`` when every prompt filled every chunk."""
        if isinstance(prompts, str):
            prompts = [prompts]
        chunked = [self.chunk_ids(p) for p in prompts]
        n_chunks = max(len(c) for c in chunked)
        filler = self._prefix + self._suffix  # the empty prompt
        flat = [c[i] if i < len(c) else filler for c in chunked for i in range(n_chunks)]
        batch = self.tokenizer.pad({"input_ids": flat}, padding="max_length", max_length=self.max_length,
                                   return_tensors="pt")
        states = self._states(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        states = states.reshape(len(prompts), n_chunks * self.max_length, states.shape[-1])
        if all(len(c) == n_chunks for c in chunked):
            return states, None
        mask = torch.zeros(len(prompts), n_chunks, self.max_length, dtype=torch.long, device=states.device)
        for row, c in enumerate(chunked):
            mask[row, :len(c)] = 1
        return states, mask.reshape(len(prompts), n_chunks * self.max_length)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token states ``(batch, chunks * max_length, hidden)`` of the configured hidden layer."""
        return self.encode_with_mask(prompts)[0]

    def _states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hidden_layer == -1:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states
        if not -len(hidden) <= self.hidden_layer < len(hidden):
            raise PolyBridgeValueError(f"{self.code}: encoder.hidden_layer {self.hidden_layer} is out of range for "
                             f"{self.name!r}, which has {len(hidden)} hidden states (0 = embeddings, -1 = last)")
        return hidden[self.hidden_layer]

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)


def _check_local(path: Path | str, entry: LanguageEntry, what: str, hint: str) -> None:
    if isinstance(path, Path) and not path.exists():
        raise PolyBridgeFileNotFoundError(f"language {entry.code!r} ({entry.name}): {what} folder {path} does not exist "
                                f"({entry.file}); {hint}")
    if isinstance(path, Path) and path.is_dir() and not any(p for p in path.iterdir() if not p.name.startswith(".")):
        raise PolyBridgeFileNotFoundError(f"language {entry.code!r} ({entry.name}): {what} folder {path} is empty "
                                          f"({entry.file}); {hint}")


#: The weights polybridge reads, and the pickled ones it refuses (a pickle can run code when it is loaded).
_SAFE_WEIGHTS = ".safetensors"
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
CONVERT_HINT = ("convert it once, where you trust the file, with `python -c \"import transformers; "
                "transformers.{cls}.from_pretrained('{src}', use_safetensors=False).save_pretrained('{src}')\"` "
                "(save_pretrained writes model.safetensors), or use the hub's safetensors conversion")


def _model_class(entry: LanguageEntry) -> Any:
    """``encoder.model_class``: any transformers model class (a text model, a full checkpoint with ``text_tower``,
    an ``Auto`` class)."""
    import transformers

    assert entry.encoder is not None
    model_cls = getattr(transformers, entry.encoder.model_class, None)
    if model_cls is None or not hasattr(model_cls, "from_pretrained"):
        raise RegistryError(entry.file, "encoder.model_class",
                            f"transformers {transformers.__version__} has no model class {entry.encoder.model_class!r}")
    return model_cls


def _refuse_pickled(entry: LanguageEntry, source: Path | str) -> None:
    """A local checkpoint with pickled weights only is refused before transformers sees it, saying how to convert."""
    spec = entry.encoder
    assert spec is not None
    if not (isinstance(source, Path) and source.is_dir()):
        return
    variant = f".{spec.variant}" if spec.variant else ""
    files = [f.name for f in source.iterdir()]
    if any(f.endswith(variant + _SAFE_WEIGHTS) for f in files):
        return
    pickled = [f for f in files if f in _PICKLED_WEIGHTS or (f.startswith("pytorch_model") and f.endswith(".bin"))]
    if pickled:
        raise PolyBridgeValueError(
            f"language {entry.code!r}: encoder {source} has no model{variant}{_SAFE_WEIGHTS} weights, only "
            f"{', '.join(sorted(pickled))}, which polybridge never unpickles (loading a pickle can run code); "
            + CONVERT_HINT.format(cls=spec.model_class, src=source) + f" ({entry.file}, key encoder.source)")


def _pickle_hint(exc: OSError, entry: LanguageEntry, source: Path | str) -> str:
    assert entry.encoder is not None
    if "safetensors" in str(exc) or ".bin" in str(exc):
        return ("; polybridge reads safetensors weights only and never unpickles a .bin: "
                + CONVERT_HINT.format(cls=entry.encoder.model_class, src=source))
    return ""


def _text_model(entry: LanguageEntry, model: torch.nn.Module) -> torch.nn.Module:
    """What reads the prompt: the ``text_tower`` of a full checkpoint (CLIPModel, ChineseCLIPModel, AltCLIPModel...),
    an encoder-decoder's encoder, else the model; an error says why a model cannot serve."""
    import inspect

    spec = entry.encoder
    assert spec is not None
    where = f"({entry.file}, key encoder.model_class)"
    kind = type(model).__name__
    if spec.text_tower:
        tower = getattr(model, spec.text_tower, None)
        if not isinstance(tower, torch.nn.Module):
            towers = [n for n, _ in model.named_children() if "text" in n] or [n for n, _ in model.named_children()]
            raise RegistryError(entry.file, "encoder.text_tower", f"{kind} has no module {spec.text_tower!r}",
                                valid=towers)
        model = tower
    elif hasattr(model, "text_model") and hasattr(model, "vision_model"):
        raise RegistryError(entry.file, "encoder.text_tower", f"{kind} is a full text-and-image checkpoint: name "
                            "its text tower (text_tower: text_model)", valid=["text_model"])
    elif getattr(getattr(model, "config", None), "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()  # T5Model, MT5ForConditionalGeneration...: the encoder reads the prompt
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        raise PolyBridgeValueError(f"language {entry.code!r}: {kind} cannot serve as a native encoder: its forward "
                                   f"takes no input_ids (it reads {', '.join(list(params)[:3])}) {where}")
    if type(model).__name__.endswith(("ForCausalLM", "ForMaskedLM", "LMHeadModel", "ForSequenceClassification")):
        raise PolyBridgeValueError(f"language {entry.code!r}: {kind} gives its head's outputs (logits), not token "
                                   f"states; name its base model class (e.g. AutoModel) {where}")
    return model


def load_encoder(entry: LanguageEntry, torch_dtype: torch.dtype | None = None,
                 max_chunks: int = DEFAULT_MAX_CHUNKS) -> NativeEncoder:
    """Load the native encoder and tokenizer of a registry entry, frozen, in eval mode.

    Weights are read from safetensors only (a ``.bin``-only checkpoint is refused, saying how to convert it);
    ``encoder.variant`` picks ``model.<variant>.safetensors``; a local source is read with ``local_files_only=True``;
    ``trust_remote_code`` is on only when the entry asks for it. Missing or incomplete weights are
    an error, never a randomly initialised model.
    """
    import transformers
    from safetensors import SafetensorError

    if entry.encoder is None:
        raise RegistryError(entry.file, "encoder", f"{entry.code!r} is the backbone's language and has no native encoder")
    spec = entry.encoder
    source, tok_source = entry.encoder_source, entry.tokenizer_source
    _check_local(source, entry, "encoder", ENCODER_BUILD_HINT.format(code=entry.code))
    _check_local(tok_source, entry, "tokenizer", TOKENIZER_BUILD_HINT.format(code=entry.code))

    model_cls = _model_class(entry)
    _refuse_pickled(entry, source)
    if spec.tokenizer_class == "auto":
        tokenizer_cls = transformers.AutoTokenizer
    else:
        tokenizer_cls = getattr(transformers, spec.tokenizer_class, None)
        if tokenizer_cls is None or not hasattr(tokenizer_cls, "from_pretrained"):
            raise RegistryError(entry.file, "encoder.tokenizer_class",
                                f"transformers {transformers.__version__} has no tokenizer class {spec.tokenizer_class!r}",
                                valid=["auto", "a transformers tokenizer class name"])

    def hub_kwargs(src: Path | str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
        if isinstance(src, Path):
            kwargs["local_files_only"] = True
        elif spec.revision:
            kwargs["revision"] = spec.revision
        return kwargs

    model_kwargs = hub_kwargs(source)
    if torch_dtype is not None:
        model_kwargs["dtype"] = torch_dtype
    if spec.variant:
        model_kwargs["variant"] = spec.variant
    try:
        model, info = model_cls.from_pretrained(str(source), use_safetensors=True, output_loading_info=True,
                                                **model_kwargs)
    except (OSError, SafetensorError) as exc:  # a zero-byte or truncated safetensors file is a SafetensorError
        raise PolyBridgeOSError(f"language {entry.code!r}: cannot load encoder {spec.model_class} from {source} "
                      f"({entry.file}, key encoder.source): {short(exc)}{_pickle_hint(exc, entry, source)}") from exc
    check_finite(model.named_parameters(), f"language {entry.code!r}: encoder weights in {source} "
                 f"({entry.file}, key encoder.source)")
    missing = sorted(str(k) for k in info.get("missing_keys", ()) if k)
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        raise PolyBridgeValueError(f"language {entry.code!r}: encoder weights in {source} do not fit {spec.model_class} "
                         f"(missing: {', '.join(map(str, missing[:8])) or 'none'}; wrong shape: "
                         f"{', '.join(str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched[:8]) or 'none'}); "
                         "refusing to run with randomly initialised weights")
    model = _text_model(entry, model)
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = tokenizer_cls.from_pretrained(str(tok_source), **hub_kwargs(tok_source))
    except OSError as exc:
        raise PolyBridgeOSError(f"language {entry.code!r}: cannot load tokenizer from {tok_source} "
                      f"({entry.file}, key encoder.tokenizer): {exc}") from exc
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and spec.max_length > positions:
        raise RegistryError(entry.file, "encoder.max_length",
                            f"{spec.max_length} is longer than the encoder's {positions} positions")
    return NativeEncoder(model, tokenizer, code=entry.code, name=spec.source, hidden_layer=spec.hidden_layer,
                         max_length=spec.max_length, max_chunks=max_chunks)
