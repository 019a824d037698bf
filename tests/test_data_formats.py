"""Real training data: every local format ``datasets`` reads, images of any size and mode resized and cropped, bad
rows, and the sharded on-disk cache of encodings (incremental, resumable, memory-mapped)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, registry_with_tiny_backbone
from PIL import Image

from polybridge.registry import DataSpec, load_registry
from polybridge.training.branch_data import (
    DataError,
    ShardedRows,
    encode_stream_part,
    fit_image,
    load_examples,
    open_dataset,
    read_sharded_cache,
)
from polybridge.training.trainer import TrainOptions, train_language

#: (size, mode) of the rows: wide, tall, tiny, grey, with alpha, palette, 16-bit grey
SHAPES = [((40, 20), "RGB"), ((12, 30), "RGB"), ((5, 5), "RGB"), ((33, 17), "L"), ((20, 20), "RGBA"),
          ((18, 24), "P"), ((16, 16), "I;16")]
CAPTIONS = [f"红色的圆 {i}" for i in range(len(SHAPES))]


def _image(i: int) -> Image.Image:
    (w, h), mode = SHAPES[i]
    rgb = Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # 16-bit grey
    return rgb.convert(mode)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _files(folder: Path) -> list[str]:
    (folder / "images").mkdir(parents=True)
    names = []
    for i in range(len(SHAPES)):
        (folder / "images" / f"{i}.png").write_bytes(_png(i))
        names.append(f"images/{i}.png")
    return names


def _rows_dataset():
    import datasets

    return datasets.Dataset.from_dict({"image": [_png(i) for i in range(len(SHAPES))], "caption_zh": CAPTIONS},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "caption_zh": datasets.Value("string")}))


def _write(fmt: str, root: Path) -> tuple[str, dict]:
    """A dataset of the rows in format ``fmt`` under ``root``: (data.dataset, other DataSpec keys)."""
    import datasets

    if fmt == "imagefolder":
        names = _files(root / "d")
        rows = [json.dumps({"file_name": n, "caption_zh": c}, ensure_ascii=False) for n, c in zip(names, CAPTIONS)]
        (root / "d" / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return "./d", {}
    if fmt in ("csv", "jsonl"):
        names = _files(root / "d")
        if fmt == "csv":
            lines = ["file,caption_zh"] + [f"{n},{c}" for n, c in zip(names, CAPTIONS)]
            (root / "d" / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
            return "./d/pairs.csv", {"image_column": "file"}
        lines = [json.dumps({"file": n, "caption_zh": c}, ensure_ascii=False) for n, c in zip(names, CAPTIONS)]
        (root / "d" / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return "./d/pairs.jsonl", {"image_column": "file"}
    ds = _rows_dataset()
    if fmt == "parquet-file":
        ds.to_parquet(str(root / "pairs.parquet"))
        return "./pairs.parquet", {}
    if fmt == "parquet-folder":
        (root / "d").mkdir()
        ds.select(range(4)).to_parquet(str(root / "d" / "a.parquet"))
        ds.select(range(4, len(SHAPES))).to_parquet(str(root / "d" / "b.parquet"))
        return "./d", {}
    if fmt == "hub-copy":  # a hub dataset repository as snapshot_download leaves it
        (root / "d" / "data").mkdir(parents=True)
        ds.to_parquet(str(root / "d" / "data" / "train-00000-of-00001.parquet"))
        (root / "d" / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                              "    path: data/train-*\n---\n# pairs\n", encoding="utf-8")
        return "./d", {}
    if fmt == "webdataset":
        (root / "d").mkdir()
        for t, rows in enumerate((range(4), range(4, len(SHAPES)))):
            with tarfile.open(root / "d" / f"shard-{t}.tar", "w") as tar:
                for i in rows:
                    for ext, data in (("png", _png(i)), ("txt", CAPTIONS[i].encode())):
                        info = tarfile.TarInfo(f"{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return "./d", {"image_column": "png", "caption_column": "txt"}
    if fmt == "arrow":
        (root / "d").mkdir()
        arrow = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(len(SHAPES))],
                                            "caption_zh": CAPTIONS}, features=ds.features)
        arrow.save_to_disk(str(root / "saved"))
        import shutil
        for f in (root / "saved").glob("*.arrow"):
            shutil.copy(f, root / "d" / "pairs.arrow")
        return "./d/pairs.arrow", {}
    if fmt == "saved":
        ds.save_to_disk(str(root / "d"))
        return "./d", {}
    raise AssertionError(fmt)


FORMATS = ["imagefolder", "csv", "jsonl", "parquet-file", "parquet-folder", "hub-copy", "webdataset", "arrow", "saved"]


@pytest.fixture(scope="module")
def base_entry():
    return load_registry(REPO).language("zh")


def _entry(base, root: Path, dataset: str, **keys):
    keys = {"caption_column": "caption_zh", **keys}
    return dataclasses.replace(base, folder=root, data=DataSpec(dataset=dataset, **keys))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_local_format_reads_every_row_at_the_backbone_size(base_entry, tmp_path, fmt, streaming):
    dataset, keys = _write(fmt, tmp_path)
    entry = _entry(base_entry, tmp_path, dataset, streaming=streaming, **keys)
    examples = load_examples(None, entry, image_size=16, seed=0)
    stream = examples.stream
    part, _ = stream.split(0, 1)
    rows = [row for _, row in stream.rows(part)]
    assert len(rows) == len(SHAPES)
    by_caption = {c: p for c, _, p in rows}
    assert sorted(by_caption) == sorted(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        assert by_caption[caption].shape == (3, 16, 16)
        assert torch.equal(by_caption[caption], fit_image(_image(i), 16))


def test_resize_and_crop():
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3)), "RGB")  # 64x32
    centre = fit_image(wide, 16)
    # the shorter side to 16 (64x32 -> 32x16), then the middle 16 columns: values around the centre of the ramp
    assert centre.shape == (3, 16, 16) and abs(float(centre.mean())) < 0.1
    randoms = [fit_image(wide, 16, "random", ("seed", i)) for i in range(8)]
    assert torch.equal(randoms[0], fit_image(wide, 16, "random", ("seed", 0)))  # the same on every run
    assert len({float(r.mean()) for r in randoms}) > 1  # and not always the same square
    same = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8), "RGB")
    assert torch.equal(fit_image(same, 16), torch.from_numpy(np.asarray(same, dtype=np.float32)).permute(2, 0, 1)
                       / 127.5 - 1.0)  # already the backbone's size: used as it is
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.equal(fit_image(transparent, 4), torch.ones(3, 4, 4))  # alpha over white


def _bad_rows_parquet(root: Path) -> str:
    import datasets

    images = [_png(0), b"truncated", None, _png(1), _png(2)]
    captions = ["好", "坏图", "没有图", "", None]
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} if b else None for b in images],
                                "caption_zh": captions},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "caption_zh": datasets.Value("string")})
                               ).to_parquet(str(root / "bad.parquet"))
    return "./bad.parquet"


def test_bad_rows_are_an_error_by_default_or_a_counted_logged_skip(base_entry, tmp_path):
    dataset = _bad_rows_parquet(tmp_path)
    for streaming in (False, True):
        stream = load_examples(None, _entry(base_entry, tmp_path, dataset, streaming=streaming), image_size=8,
                               seed=0).stream
        part, _ = stream.split(0, 1)
        outcomes = [type(r).__name__ if not isinstance(r, tuple) else "ok" for _, r in stream.rows(part)]
        assert outcomes == ["ok", "BadRow", "BadRow", "BadRow", "BadRow"]
    tiny = _tiny_models()
    stream = load_examples(None, _entry(base_entry, tmp_path, dataset), image_size=16, seed=0).stream
    with pytest.raises(DataError, match=r"row 1 of process 0's part .*: the image does not decode.*data.bad_rows: skip"):
        encode_stream_part(stream, tmp_path / "c1", "k", 0, 1, **tiny)
    stream.bad_rows = "skip"
    said = []
    done = encode_stream_part(stream, tmp_path / "c2", "k", 0, 1, **{**tiny, "log": said.append})
    assert done["rows"] == 1 and done["skipped"] == 4 and len([s for s in said if "skipped" in s]) == 4
    skipped = [json.loads(line) for line in (tmp_path / "c2" / "part-00000-of-00001" / "skipped.jsonl").read_text()
               .splitlines()]
    assert [s["row"] for s in skipped] == [1, 2, 3, 4] and "not text" in skipped[3]["reason"]


def test_a_missing_column_and_a_file_that_disappears(base_entry, tmp_path):
    dataset, _keys = _write("parquet-folder", tmp_path)
    with pytest.raises(DataError, match=r"data.caption_column: no column 'text'; its columns are image, caption_zh"):
        load_examples(None, _entry(base_entry, tmp_path, dataset, caption_column="text", streaming=True),
                      image_size=16, seed=0)
    stream = load_examples(None, _entry(base_entry, tmp_path, dataset, streaming=True), image_size=16, seed=0).stream
    part, _ = stream.split(0, 1)
    rows = stream.rows(part)
    next(rows)
    (tmp_path / "d" / "b.parquet").unlink()  # a shard disappears while the data is read
    with pytest.raises(DataError, match=r"a file of the dataset could not be read at row 4 .*restore the file"):
        list(rows)


def _tiny_models():
    from tiny_components import get_dummy_components, native_encoder

    from polybridge.backbones import Backbone

    c = get_dummy_components()
    backbone = Backbone(**{k: c[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")})
    return dict(vae=c["vae"], encoder=native_encoder(), backbone=backbone, english=False, device="cpu",
                dtype=torch.float32, batch_size=4)


def test_the_cache_is_written_in_shards_resumes_after_a_kill_and_is_read_memory_mapped(base_entry, tmp_path,
                                                                                        monkeypatch):
    import polybridge.training.branch_data as bd

    dataset, _keys = _write("parquet-folder", tmp_path)
    entry = _entry(base_entry, tmp_path, dataset, streaming=True, cache_shard_rows=2)
    tiny = _tiny_models()
    full = encode_stream_part(load_examples(None, entry, image_size=16, seed=0).stream, tmp_path / "full", "k", 0, 1,
                              **tiny)
    assert full["files"] == 4 and full["rows"] == len(SHAPES)
    real, calls = bd.encode_examples, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill in the middle of encoding
        return real(*args, **kwargs)

    monkeypatch.setattr(bd, "encode_examples", killed)
    stream = load_examples(None, entry, image_size=16, seed=0).stream
    with pytest.raises(KeyboardInterrupt):
        encode_stream_part(stream, tmp_path / "killed", "k", 0, 1, **tiny)
    part = tmp_path / "killed" / "part-00000-of-00001"
    assert len(list(part.glob("shard-*.safetensors"))) == 2 and not (part / "done.json").exists()
    monkeypatch.setattr(bd, "encode_examples", real)
    said = []
    again = encode_stream_part(stream, tmp_path / "killed", "k", 0, 1, **{**tiny, "log": said.append})
    assert again["rows"] == len(SHAPES) and any("after 2 files (4 examples)" in s for s in said)
    a, _ = read_sharded_cache(tmp_path / "full", "k", 1)
    b, summary = read_sharded_cache(tmp_path / "killed", "k", 1)
    assert isinstance(a["latents"], ShardedRows) and summary["rows"] == len(SHAPES)
    rows = torch.tensor([6, 0, 3])
    assert torch.equal(a["latents"][rows], b["latents"][rows]) and torch.equal(a["states"][rows], b["states"][rows])
    with pytest.raises(DataError, match=r"written for other encoders, backbone or data"):
        read_sharded_cache(tmp_path / "full", "another-key", 1)


def test_trains_on_a_streamed_dataset_of_varied_sizes_and_reuses_its_cache(tmp_path):
    from conftest import point_at_parquet

    registry = point_at_parquet(registry_with_tiny_backbone(tmp_path / "repo"), "zh", 12, crop="random",
                                cache_shard_rows=5)
    reg = load_registry(registry)
    said = []
    opts = dict(max_steps=2, batch_size=4, warmup_steps=1, progress=False, work_dir=tmp_path / "work",
                out_dir=tmp_path / "out", branch_type="pea")
    info = train_language(reg, "zh", TrainOptions(**opts), log=said.append)
    assert info["examples"] == 12 and info["settings"]["data"]["streaming"] is True
    assert info["settings"]["data"]["crop"] == "random" and info["final_loss"] is not None
    assert any("12 examples in 3 cache files" in s for s in said)
    files = sorted((tmp_path / "work" / "encoded").rglob("shard-*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = train_language(reg, "zh", TrainOptions(**opts, overwrite=True), log=lambda _m: None)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # the cache was read, not written again
    assert again["final_loss"] == info["final_loss"]


def test_a_cache_file_that_disappears_during_training_is_a_clear_error(base_entry, tmp_path):
    dataset, _ = _write("parquet-folder", tmp_path)
    stream = load_examples(None, _entry(base_entry, tmp_path, dataset, cache_shard_rows=3), image_size=16,
                           seed=0).stream
    encode_stream_part(stream, tmp_path / "c", "k", 0, 1, **_tiny_models())
    tensors, _ = read_sharded_cache(tmp_path / "c", "k", 1)
    assert tensors["latents"][torch.tensor([0])].shape == (1, 4, 8, 8)
    victim = sorted((tmp_path / "c").rglob("shard-000001.safetensors"))[0]
    victim.unlink()
    with pytest.raises(DataError, match=r"shard-000001.safetensors cannot be read any more .*delete .*part-00000-of-00001 and run again"):
        tensors["latents"][torch.tensor([4])]
    with pytest.raises(DataError, match=r"part-00000-of-00001 holds 2 cache files, 3 were written: delete that folder"):
        read_sharded_cache(tmp_path / "c", "k", 1)
    import shutil
    shutil.rmtree(victim.parent)
    encode_stream_part(stream, tmp_path / "c", "k", 0, 1, **_tiny_models())
    assert read_sharded_cache(tmp_path / "c", "k", 1)[1]["rows"] == len(SHAPES)


def test_a_hub_id_is_read_by_load_dataset_streamed_or_not(base_entry, tmp_path, monkeypatch):
    import datasets

    local = _rows_dataset()
    calls = []

    def load_dataset(path, **kwargs):  # the hub, offline: the same rows, as load_dataset gives them
        calls.append((path, kwargs))
        ds = local.to_iterable_dataset() if kwargs.get("streaming") else local
        return (datasets.IterableDatasetDict if kwargs.get("streaming") else datasets.DatasetDict)({"train": ds})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for streaming in (False, True):
        entry = _entry(base_entry, tmp_path, "someone/pairs-zh", streaming=streaming)
        ds = open_dataset(entry)
        assert isinstance(ds, datasets.IterableDataset) == streaming
    assert calls == [("someone/pairs-zh", {"streaming": False}), ("someone/pairs-zh", {"streaming": True})]
    with pytest.raises(DataError, match=r"has no split 'test' .*valid: train"):
        open_dataset(_entry(base_entry, tmp_path, "someone/pairs-zh", split="test"))


def test_a_camera_orientation_tag_is_applied():
    from polybridge.training.branch_data import decode_image

    tall = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 10, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 10)
