"""The training perf scripts run end to end on a few tiny steps: the throughput benchmark for both branch types,
and the step-variants one.

Nothing is timed here: timing is the benchmarks' job, on a quiet machine. This only keeps the scripts from rotting:
both loops must train, on the same examples, and the figures printed must be the ones computed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"perf_{name}", REPO / "benchmarks" / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("branch_type, streamed", [("bdm", False), ("pea", False), ("pea", True)],
                         ids=["bdm", "pea", "pea-streamed"])
def test_train_throughput_runs_both_loops(branch_type, streamed, capsys):
    throughput = _load("train_throughput")
    assert throughput.main(["--branch-type", branch_type, "--batch-size", "4", "--steps", "2", "--warmup", "1",
                            "--num-samples", "16", "--json", *(["--streamed-data"] if streamed else [])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["branch_type"] == branch_type and result["examples"] == 16
    assert result["data"] == ("streamed parquet, JPEGs of varied sizes" if streamed else "synthetic")
    assert result["polybridge_samples_per_s"] > 0 and result["diffusers_style_samples_per_s"] > 0
    # the rates are printed to 3 significant digits (0.5% each at most), the ratio to 2 decimals
    from_rates = result["polybridge_samples_per_s"] / result["diffusers_style_samples_per_s"]
    assert abs(result["ratio"] - from_rates) <= 0.0101 * from_rates + 0.0051
    # encoding a batch is one part of a diffusers-style step (the branch, UNet and optimizer are the rest)
    assert 0 < result["diffusers_style_encode_ms"] < result["diffusers_style_step_ms"]
    assert result["caching_ceiling"] > 1


def test_train_throughput_flags_are_checked():
    throughput = _load("train_throughput")
    with pytest.raises(SystemExit):
        throughput.main(["--backbone", "x", "--sd15"])
    with pytest.raises(SystemExit):
        throughput.main(["--steps", "0"])


def test_train_step_variants_time_every_variant(capsys):
    variants = _load("train_step_variants")
    assert variants.main(["--variants", "plain", "channels_last", "bf16", "--batch-size", "2", "--rounds", "2",
                          "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "channels_last" in out and "1.00x of plain" in out
    assert variants.main(["--attention", "--batch-size", "2", "--rounds", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "latent" in line]
    assert len(rows) == 3 and all(float(x) > 0 for row in rows for x in row[-3:])
    with pytest.raises(SystemExit):
        variants.main(["--variants", "fast"])


@pytest.mark.slow
def test_data_scale_reports_every_size(capsys):
    data_scale = _load("data_scale")
    assert data_scale.main(["--sizes", "40", "80", "--steps", "2", "--batch-size", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["size"] for r in lines] == [40, 80] and [r["examples"] for r in lines] == [40, 80]
    assert all(r["peak_rss_mb"] > 0 and r["train_samples_per_s"] > 0 for r in lines)


def test_inference_step_and_memory_parts_run(tmp_path, capsys):
    """The inference benchmark's step part times steps apart from calls, and its memory part, in a fresh process,
    finds each parameter held once and the process grown by at least the parts' bytes."""
    inference = _load("inference")
    out = tmp_path / "inference.json"
    assert inference.main(["--parts", "step", "memory", "--steps", "3", "--batch", "1", "--rounds", "1",
                           "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    step = result["step"]
    assert set(step["step_seconds"]) == {"plain", "bdm", "pea"}
    for side, seconds in step["step_seconds"].items():
        assert 0 < seconds < step["seconds"][side]  # a step is part of a call
    split = step["bdm_step_split_seconds"]
    assert 0 < split["branch"] < step["step_seconds"]["bdm"] and 0 < split["unet_in_a_plain_step"]
    memory = result["memory"]
    assert memory["languages_loaded"] == ["zh", "ja", "ko", "ru", "ar", "es"]
    assert memory["each_parameter_once"] is True
    assert memory["loaded_bytes"] >= memory["parts_apart_bytes"] * 0.9  # fp32 weights in memory are read, not guessed
    assert memory["peak_in_a_call_bytes"] >= memory["loaded_bytes"]
    assert "memory with 6 languages loaded" in capsys.readouterr().out


def test_inference_profile_times_the_vae(tmp_path):
    """The profile splits the mixed call's time by module; the VAE decodes through ``decode()``, not its forward,
    so it used to count as "rest" (0% VAE)."""
    inference = _load("inference")
    out = tmp_path / "inference.json"
    assert inference.main(["--parts", "profile", "--steps", "1", "--profile-rounds", "1", "--threads", "1",
                           "--out", str(out)]) == 0
    split = json.loads(out.read_text(encoding="utf-8"))["profile"]["mixed_call_split"]
    assert split["vae"] > 0 and split["unet"] > 0 and split["branches"] > 0
    assert abs(sum(split.values()) - 1) < 1e-6
