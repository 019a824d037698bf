"""Native encoders as checkpoints are published: full CLIP-style models with a named text tower, any transformers
text model, an fp16 variant, and .bin-only folders refused unread. Tiny random-weight models built here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import REPO
from tiny_components import EOS, clip_tokenizer

from polybridge.encoders import load_encoder
from polybridge.errors import PolyBridgeError
from polybridge.registry import EncoderSpec, RegistryError, load_registry

VOCAB = EOS + 1
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)


def _clip_text(**extra):
    return {**TEXT, "bos_token_id": EOS - 1, "eos_token_id": EOS, "pad_token_id": EOS, **extra}


def _vision():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                patch_size=8)


def _bert_like():
    return {**TEXT, "type_vocab_size": 1, "pad_token_id": EOS}


#: model_class, text_tower, how to build it, the width of the states the branch reads (last hidden state)
MODELS = {
    "CLIPModel": ("text_model", lambda: T.CLIPModel(T.CLIPConfig(text_config=_clip_text(),
                                                                  vision_config=_vision(), projection_dim=24)), 32),
    "ChineseCLIPModel": ("text_model", lambda: T.ChineseCLIPModel(T.ChineseCLIPConfig(
        text_config=_bert_like(), vision_config=_vision(), projection_dim=24)), 32),
    # AltCLIP's text model projects its last state to project_dim (24), not hidden_size (32)
    "AltCLIPModel": ("text_model", lambda: T.AltCLIPModel(T.AltCLIPConfig(
        text_config={**_bert_like(), "project_dim": 24, "max_position_embeddings": 70, "pad_token_id": 1},
        vision_config=_vision(), projection_dim=24)), 24),
    "AltCLIPTextModel": (None, lambda: T.AltCLIPTextModel(T.AltCLIPTextConfig(
        **{**_bert_like(), "project_dim": 24, "max_position_embeddings": 70, "pad_token_id": 1})), 24),
    "UMT5EncoderModel": (None, lambda: T.UMT5EncoderModel(T.UMT5Config(
        vocab_size=VOCAB, d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=EOS)), 40),
    "SiglipTextModel": (None, lambda: T.SiglipTextModel(T.SiglipTextConfig(**_clip_text(projection_size=32))), 32),
    "AutoModel": (None, lambda: T.XLMRobertaModel(T.XLMRobertaConfig(**{**_bert_like(), "hidden_size": 36,
                                                                        "num_attention_heads": 4,
                                                                        "max_position_embeddings": 70,
                                                                        "pad_token_id": 1})), 36),
}


@pytest.fixture(scope="module")
def base_entry():
    return load_registry(REPO).language("zh")


def _entry(base, folder: Path, model_class: str, **spec):
    clip_tokenizer(16).save_pretrained(folder / "tokenizer")
    return dataclasses.replace(base, folder=folder, encoder=EncoderSpec(
        source="./encoder", model_class=model_class, tokenizer="./tokenizer", max_length=16, **spec))


@pytest.mark.parametrize("model_class", list(MODELS))
def test_published_checkpoints_load_and_give_the_width_they_really_have(base_entry, tmp_path, model_class):
    tower, build, width = MODELS[model_class]
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path / "encoder")
    encoder = load_encoder(_entry(base_entry, tmp_path, model_class, text_tower=tower))
    states = encoder.encode(["红色的圆", ""])
    assert encoder.hidden_size == width == states.shape[-1] and states.shape[:2] == (2, 16)
    text = getattr(model, tower) if tower else model
    ids = encoder.tokenizer.pad({"input_ids": encoder.chunk_ids("红色的圆")}, padding="max_length", max_length=16,
                                return_tensors="pt")
    with torch.no_grad():
        direct = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    assert torch.allclose(states[:1], direct, atol=1e-5)  # the tower itself, with its trained weights
    if tower is not None:
        with pytest.raises(RegistryError, match=r"encoder.text_tower: .* full text-and-image checkpoint.*text_model"):
            load_encoder(_entry(base_entry, tmp_path, model_class))
        with pytest.raises(RegistryError, match=r"encoder.text_tower: .* has no module 'text'"):
            load_encoder(_entry(base_entry, tmp_path, model_class, text_tower="text"))


def test_altclip_hidden_layer_other_than_the_last_is_hidden_size_wide(base_entry, tmp_path):
    _, build, _ = MODELS["AltCLIPTextModel"]
    build().save_pretrained(tmp_path / "encoder")
    encoder = load_encoder(_entry(base_entry, tmp_path, "AltCLIPTextModel", hidden_layer=-2))
    assert encoder.hidden_size == 32 == encoder.encode(["a"]).shape[-1]


def test_fp16_variant(base_entry, tmp_path):
    model = MODELS["SiglipTextModel"][1]()
    model.half().save_pretrained(tmp_path / "encoder", variant="fp16")
    assert (tmp_path / "encoder" / "model.fp16.safetensors").is_file()
    with pytest.raises(PolyBridgeError, match="model.safetensors"):
        load_encoder(_entry(base_entry, tmp_path, "SiglipTextModel"))
    encoder = load_encoder(_entry(base_entry, tmp_path, "SiglipTextModel", variant="fp16"), torch_dtype=torch.float32)
    assert encoder.dtype == torch.float32 and encoder.hidden_size == 32


def test_a_bin_only_checkpoint_is_refused_unread_with_how_to_convert(base_entry, tmp_path, monkeypatch):
    model = MODELS["CLIPModel"][1]()
    model.config.save_pretrained(tmp_path / "encoder")
    torch.save(model.state_dict(), tmp_path / "encoder" / "pytorch_model.bin")  # as older checkpoints are published

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(PolyBridgeError, match=r"only pytorch_model.bin, which polybridge never unpickles.*"
                                              r"save_pretrained.*model.safetensors"):
        load_encoder(_entry(base_entry, tmp_path, "CLIPModel", text_tower="text_model"))


def test_a_model_that_cannot_serve_says_why(base_entry, tmp_path):
    T.CLIPVisionModel(T.CLIPVisionConfig(**_vision())).save_pretrained(tmp_path / "encoder")
    with pytest.raises(PolyBridgeError, match=r"CLIPVisionModel cannot serve as a native encoder: its forward takes "
                                              r"no input_ids"):
        load_encoder(_entry(base_entry, tmp_path, "CLIPVisionModel"))
    with pytest.raises(RegistryError, match="has no model class 'NoSuchModel'"):
        load_encoder(_entry(base_entry, tmp_path, "NoSuchModel"))
