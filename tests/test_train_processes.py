"""The trainer across processes: two CPU ranks under ``accelerate launch`` (gloo), and resume after ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import pytest

from conftest import REPO, point_at_parquet, registry_with_tiny_backbone
from polybridge.registry import load_registry
from polybridge.training.trainer import TrainOptions, train_language

COMMON = ["--lang", "zh", "--num-samples", "32", "--warmup", "1", "--no-progress", "--threads", "1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("data", ["synthetic", pytest.param("streamed", marks=pytest.mark.slow)])
def test_two_cpu_processes_train_disjoint_shards_to_identical_weights(tmp_path, data):
    registry = registry_with_tiny_backbone(tmp_path / "repo")
    if data == "streamed":  # two parquet files, each process reads its own and encodes it into its own cache part
        registry = point_at_parquet(registry, "zh", 32, files=2)
    # lr pinned: the all-reduce sums gradients in another order than one process does, and Adam turns those
    # last-bit differences into weight differences that grow with the learning rate (what is tested here is the
    # sharding and the sync).
    train = ["--steps", "3", "--batch-size", "8", "--lr", "1e-4", "--log-data-order", *COMMON]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "polybridge.cli", "--registry", str(registry), "train",
              *train, "--work", str(tmp_path / "work2"), "--out", str(tmp_path / "out2")]
    done = subprocess.run(launch, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "work2" / "data_order" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # One process, same entry and flags: the global batches the two ranks split between them.
    single = train_language(load_registry(registry), "zh", TrainOptions(
        max_steps=3, batch_size=8, learning_rate=1e-4, num_samples=32, warmup_steps=1, progress=False,
        log_data_order=True,
        work_dir=tmp_path / "work1", out_dir=tmp_path / "out1"), log=lambda _m: None)
    one = json.loads((tmp_path / "work1" / "data_order" / "rank0.json").read_text())
    for step in ("0", "1", "2"):
        a, b = ranks[0]["steps"][step], ranks[1]["steps"][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b), f"step {step}: ranks share examples {set(a) & set(b)}"
        assert a + b == one["steps"][step]
    assert ranks[0]["weights"] == ranks[1]["weights"], "the ranks hold different branch weights"
    two, ref = _weights(tmp_path / "out2"), _weights(tmp_path / "out1")
    # An Adam step moves a weight by up to about lr (1e-4), so a wrong gradient shows at that size; the reduction
    # order alone gave up to 1.6e-6 after 3 steps (zh's objects: own scenes), so 1e-5 is a tenth of one step.
    assert all(torch.allclose(two[k], ref[k], rtol=0, atol=1e-5) for k in ref)
    assert single["processes"] == 1
    if data == "streamed":
        parts = sorted(p.name for p in (tmp_path / "work2" / "encoded").glob("*/part-*"))
        assert parts == ["part-00000-of-00002", "part-00001-of-00002"]


def test_resume_after_kill_9_ends_where_an_uninterrupted_run_ends(tmp_path):
    registry = registry_with_tiny_backbone(tmp_path / "repo")
    schedule = dict(max_steps=1000, batch_size=4, num_samples=32, warmup_steps=1, checkpoint_every=3,
                    progress=False)
    reg = load_registry(registry)
    full = train_language(reg, "zh", TrainOptions(**schedule, stop_at=9, work_dir=tmp_path / "full",
                                                  out_dir=tmp_path / "out-full"), log=lambda _m: None)
    cmd = [sys.executable, "-m", "polybridge.cli", "--registry", str(registry), "train", *COMMON,
           "--steps", "1000", "--batch-size", "4", "--checkpoint-every", "3", "--work", str(tmp_path / "killed"),
           "--out", str(tmp_path / "out-killed")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    try:
        while not state.is_file() or json.loads(state.read_text())["step"] < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out-killed").exists(), "nothing is written to the branch folder before the end"
    resumed = train_language(reg, "zh", TrainOptions(**schedule, stop_at=9, resume=True, work_dir=tmp_path / "killed",
                                                     out_dir=tmp_path / "out-killed"), log=lambda _m: None)
    assert resumed["resumed_from"] in (3, 6, 9) and resumed["steps"] == 9
    a, b = _weights(tmp_path / "out-full"), _weights(tmp_path / "out-killed")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run does not end where the uninterrupted one does"
    assert resumed["losses"] == full["losses"]


#: Where DeepSpeed may be installed apart (``DS_BUILD_OPS=0 pip install --no-deps --target build/deepspeed-site
#: deepspeed hjson msgpack ninja einops``), so that importing accelerate elsewhere does not import it (its import
#: prints a warning on stdout).
DEEPSPEED_SITE = REPO / "build" / "deepspeed-site"


def _deepspeed_runs() -> str | None:
    """Why DeepSpeed cannot run here (None: it can)."""
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(DEEPSPEED_SITE), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, text=True)
    if done.returncode:
        return (f"deepspeed is not importable ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''});"
                f" `DS_BUILD_OPS=0 pip install deepspeed` (or with --target {DEEPSPEED_SITE})")
    return None


@pytest.mark.slow
def test_deepspeed_zero2_on_one_cpu_process_trains_streamed_data_like_one_plain_process(tmp_path):
    why = _deepspeed_runs()
    if why is not None:
        pytest.skip(why)
    registry = point_at_parquet(registry_with_tiny_backbone(tmp_path / "repo"), "zh", 16, files=2)
    config = (REPO / "scripts" / "accelerate" / "deepspeed_zero2.yaml").read_text(encoding="utf-8")
    config = config.replace("num_processes: 8", "num_processes: 1").replace("use_cpu: false", "use_cpu: true")
    (tmp_path / "ds.yaml").write_text(config, encoding="utf-8")
    train = ["--steps", "3", "--batch-size", "4", "--lr", "1e-4", "--checkpoint-every", "2", *COMMON]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "ds.yaml"),
              "--main_process_port", str(_free_port()), "-m", "polybridge.cli", "--registry", str(registry), "train",
              *train, "--work", str(tmp_path / "work-ds"), "--out", str(tmp_path / "out-ds")]
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(DEEPSPEED_SITE), str(REPO)])}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "work-ds" / "checkpoint" / "deepspeed").is_dir()  # ZeRO's own checkpoint of its partitions
    info = json.loads((tmp_path / "work-ds" / "train_info.json").read_text())
    assert info["examples"] == 16 and info["processes"] == 1
    train_language(load_registry(registry), "zh", TrainOptions(
        max_steps=3, batch_size=4, learning_rate=1e-4, num_samples=32, warmup_steps=1, checkpoint_every=2,
        progress=False, work_dir=tmp_path / "work1", out_dir=tmp_path / "out1"), log=lambda _m: None)
    ds, ref = _weights(tmp_path / "out-ds"), _weights(tmp_path / "out1")
    assert all(torch.allclose(ds[k], ref[k], rtol=0, atol=1e-5) for k in ref)
