"""Every launcher starts `vlp train`: DeepSpeed's (`--local_rank`), torchrun's environment, a
CUDA request on a machine without CUDA (one line, exit 2), and the GPU engine settings."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_vlp, tiny_config

from vlp.core import devices
from vlp.train.config import ConfigError, load_config
from vlp.train.trainer import deepspeed_config


def launcher_env(local_rank: int = 0) -> dict[str, str]:
    """What `deepspeed --num_gpus 1` sets for its rank (it also appends --local_rank=N)."""
    from vlp.train.distributed import free_port

    return {"RANK": "0", "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("flag, peak", [(["--local_rank=0"], None), (["--local-rank", "0"], 0.05)])
def test_deepspeed_launcher_local_rank_flag_starts_a_run(tmp_path, digits_dir, flag, peak):
    """Also the telemetry: data_wait_frac in every line; mfu only where a peak is known (on CPU:
    train.peak_tflops)."""
    config = tiny_config(tmp_path, digits_dir, train={"steps": 2, "warmup_steps": 0, "checkpoint_every": 0,
                                                      "peak_tflops": peak}, evals=[])
    proc = run_vlp("train", config, *flag, env=launcher_env())
    assert json.loads(proc.stdout.strip().splitlines()[-1])["run_dir"].endswith("tiny")
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0 <= r["data_wait_frac"] <= 1 for r in steps)
    if peak is None:
        assert not any("mfu" in r for r in steps)
    else:
        assert all(0 < r["mfu"] < 1 for r in steps)
    # train.device auto fell back to the CPU; whether it says so depends on the machine (only
    # where a GPU was expected), which tests/test_devices.py checks with the decision faked.


def test_local_rank_flag_must_agree_with_the_environment(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir)
    proc = run_vlp("train", config, "--local_rank", "1", env=launcher_env(0), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vlp: error: --local_rank 1 disagrees with LOCAL_RANK=0 set by the launcher"


def test_cuda_requested_without_cuda_is_one_line_exit_2(tmp_path, digits_dir):
    config = tiny_config(tmp_path, digits_dir)
    proc = run_vlp("train", config, "train.device=cuda", env=launcher_env(), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp: error:")]
    assert len(errors) == 1 and re.search(r"train.device=cuda: no CUDA device: .*(CUDA_VISIBLE_DEVICES|without CUDA)",
                                          errors[0]), proc.stderr


def test_nproc_more_ranks_than_gpus_is_refused_before_starting(tmp_path, digits_dir, monkeypatch, capsys):
    from vlp.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert main(["train", str(tiny_config(tmp_path, digits_dir)), "--nproc", "4"]) == 2
    assert capsys.readouterr().err.strip() == ("vlp: error: train.device: 4 ranks on this node but 2 visible GPUs "
                                               "(NCCL needs one GPU per rank): start one rank per GPU")


@pytest.mark.parametrize("override, message", [
    ("train.device=gpu", r"train.device: Input should be 'auto', 'cuda' or 'cpu'"),
    ("deepspeed.overlap_comm=true", r"deepspeed.overlap_comm needs deepspeed.zero_stage 1-3 \(got 0\)"),
    ("deepspeed.fp32_grad_reduce=true", r"deepspeed.fp32_grad_reduce: gradients are already reduced in fp32"),
    ("deepspeed.reduce_bucket_sizes=5", r'deepspeed.reduce_bucket_sizes: unknown key. Did you mean "reduce_bucket_size"'),
])
def test_device_and_engine_keys_are_validated(tmp_path, digits_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_config(tmp_path, digits_dir), [override])


def test_engine_settings_follow_the_device(tmp_path, digits_dir):
    path = tiny_config(tmp_path, digits_dir)
    zero2 = load_config(path, ["deepspeed.zero_stage=2", "deepspeed.precision=bf16"])
    on_gpu = deepspeed_config(zero2, device=torch.device("cuda", 0))
    assert on_gpu["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert "communication_data_type" not in on_gpu
    assert deepspeed_config(zero2, device=torch.device("cpu"))["zero_optimization"]["overlap_comm"] is False
    tuned = load_config(path, ["deepspeed.zero_stage=1", "deepspeed.precision=bf16", "deepspeed.overlap_comm=false",
                               "deepspeed.reduce_bucket_size=200000000", "deepspeed.allgather_bucket_size=100000000",
                               "deepspeed.fp32_grad_reduce=true"])
    ds = deepspeed_config(tuned, device=torch.device("cuda", 0))
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False, "reduce_bucket_size": 200000000,
                                       "allgather_bucket_size": 100000000}
    assert ds["communication_data_type"] == "fp32" and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    offload = load_config(path, ["deepspeed.zero_stage=2", "deepspeed.extra.zero_optimization.offload_optimizer.device=cpu"])
    assert deepspeed_config(offload, device=torch.device("cpu"))["zero_optimization"] == {
        "stage": 2, "overlap_comm": False, "offload_optimizer": {"device": "cpu"}}
    assert deepspeed_config(load_config(path), device=torch.device("cuda", 0))["zero_optimization"] == {"stage": 0}


def test_tf32_on_cuda_only():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        devices.apply_tf32(True, torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        devices.apply_tf32(True, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        devices.apply_tf32(False, torch.device("cuda", 0))
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
