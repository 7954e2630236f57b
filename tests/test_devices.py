"""The run's devices on CPU: the compute-device decision for every launcher binding (torch.cuda
monkeypatched), the collective device from the process group's backend, and the guard against
the GPU-only bug class (a CPU tensor handed to a backend that serves only CUDA tensors)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlp.core import devices
from vlp.core.devices import DeviceError, collective_device, compute_device, use_compute_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: torch sees n CUDA devices (0: none), built for CUDA 13.0; set_device is recorded."""
    chosen: list = []

    def make(count: int, built_for: str | None = "13.0"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(torch.device(device)))
        monkeypatch.setattr(torch.version, "cuda", built_for)
        return chosen

    yield make
    devices._compute_device = None


def test_cpu_is_cpu_whatever_is_visible(gpus):
    gpus(8)
    assert compute_device("cpu", 3, {}) == torch.device("cpu")


def test_auto_without_cuda_trains_on_cpu_and_says_so_where_a_gpu_was_expected(gpus, capsys):
    gpus(0)
    assigned = {"RANK": "0", "CUDA_VISIBLE_DEVICES": "0"}  # the job was given a GPU torch cannot use
    assert compute_device("auto", 0, assigned) == torch.device("cpu")
    assert "no CUDA device" in capsys.readouterr().err
    assert compute_device("auto", 1, {**assigned, "RANK": "1"}) == torch.device("cpu")
    assert capsys.readouterr().err == ""  # one line per run, from rank 0


def test_auto_on_a_machine_without_gpus_trains_on_cpu_quietly(gpus, capsys, monkeypatch):
    gpus(0)
    monkeypatch.setattr(devices.os.path, "exists", lambda path: False)  # no NVIDIA driver loaded
    assert compute_device("auto", 0, {"RANK": "0"}) == torch.device("cpu")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("built_for, environ, reason", [
    (None, {}, "built without CUDA"),
    ("13.0", {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES=''"),
    ("13.0", {}, "no GPU is visible"),
])
def test_cuda_requested_and_none_names_the_reason(gpus, built_for, environ, reason):
    gpus(0, built_for)
    with pytest.raises(DeviceError, match=f"train.device=cuda: no CUDA device: .*{reason}"):
        compute_device("cuda", 0, environ)


def test_driver_too_old_is_named(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the device is there, the driver is not
    with pytest.raises(DeviceError, match="driver is missing or too old"):
        compute_device("cuda", 0, {})


@pytest.mark.parametrize("visible, local_rank, environ, expected", [
    (1, 5, {"SLURM_NTASKS_PER_NODE": "8"}, 0),  # Slurm per-task binding: each rank sees its own GPU as 0
    (8, 3, {"LOCAL_WORLD_SIZE": "8"}, 3),  # torchrun / deepspeed: the whole node is visible
    (8, 7, {}, 7),
    (4, 2, {"SLURM_NTASKS_PER_NODE": "4(x2)"}, 2),
])
def test_local_rank_maps_to_a_visible_gpu(gpus, visible, local_rank, environ, expected):
    gpus(visible)
    for request in ("auto", "cuda"):
        assert compute_device(request, local_rank, environ) == torch.device("cuda", expected)


@pytest.mark.parametrize("local_rank, environ", [(0, {"LOCAL_WORLD_SIZE": "4"}), (1, {"SLURM_NTASKS_PER_NODE": "3"}),
                                                 (2, {})])
def test_more_local_ranks_than_gpus_is_one_line(gpus, local_rank, environ):
    gpus(2)
    with pytest.raises(DeviceError, match=r"ranks on this node but 2 visible GPUs") as error:
        compute_device("auto", local_rank, environ)
    assert "\n" not in str(error.value)


def test_use_compute_device_makes_the_gpu_current(gpus):
    chosen = gpus(8)
    use_compute_device(torch.device("cuda", 5))
    assert chosen == [torch.device("cuda", 5)] and devices.current_compute_device() == torch.device("cuda", 5)


@pytest.fixture
def one_rank_group(monkeypatch):
    """`group(backend)`: a one-rank process group in this process, torn down after the test."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")

    def make(backend: str):
        from vlp.train.distributed import free_port

        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()
    devices._compute_device = None


def test_collective_device_follows_the_backend(one_rank_group, gpus):
    gpus(8)
    one_rank_group("cuda:gloo")  # served like NCCL: CUDA tensors only
    use_compute_device(torch.device("cuda", 3))
    assert devices.backend_device_types() == ("cuda",)
    assert collective_device() == torch.device("cuda", 3)
    dist.destroy_process_group()
    one_rank_group("gloo")  # gloo on a CUDA rank: the tensors already on the GPU need no copy
    assert collective_device() == torch.device("cuda", 3)
    devices._compute_device = torch.device("cpu")
    assert collective_device() == torch.device("cpu")


def test_no_cpu_tensor_reaches_a_cuda_only_backend(one_rank_group, monkeypatch):
    """The GPU bug class on CPU: a group whose backend serves only CUDA tensors (as NCCL does).
    Forced collectives on one rank run every vlp collective as if distributed; torch itself then
    refuses any CPU tensor ("No backend type associated with device type cpu"). On this machine
    a tensor moved to the CUDA device fails for want of CUDA instead, which is the proof that it
    was moved; on the old code `all_reduce_max(float)` built a CPU tensor (and ignored forcing)."""
    from vlp.core import collectives

    monkeypatch.setenv(devices.FORCE_COLLECTIVES_ENV, "1")
    one_rank_group("cuda:gloo")
    assert collectives.is_distributed()
    cpu = torch.ones(2, 3)
    calls = [lambda: collectives.all_reduce_max(1.0), lambda: collectives.all_reduce_max(cpu),
             lambda: collectives.all_reduce_sum(cpu), lambda: collectives.gather_no_grad(cpu),
             lambda: collectives.all_gather_rows(cpu), lambda: collectives.gather_with_grad(cpu)]
    for call in calls:
        with pytest.raises((RuntimeError, AssertionError)) as error:
            call()
        assert "No backend type associated with device type cpu" not in str(error.value)


def test_forced_collectives_run_on_one_gloo_rank(one_rank_group, monkeypatch):
    """With VLP_FORCE_COLLECTIVES each helper really calls torch.distributed on one rank, and
    every tensor it hands over is on the collective device."""
    from vlp.core import collectives

    monkeypatch.setenv(devices.FORCE_COLLECTIVES_ENV, "1")
    one_rank_group("gloo")
    seen: list[torch.device] = []
    for name in ("all_reduce", "all_gather"):
        real = getattr(dist, name)

        def spy(first, *args, _real=real, **kwargs):
            tensors = first if isinstance(first, list) else [first]
            seen.extend(t.device for t in tensors)
            return _real(first, *args, **kwargs)

        monkeypatch.setattr(dist, name, spy)
    rows = torch.arange(6.0).reshape(3, 2)
    assert collectives.all_reduce_max(2.5) == 2.5
    torch.testing.assert_close(collectives.all_reduce_sum(rows), rows)
    torch.testing.assert_close(collectives.all_gather_rows(rows), rows)
    torch.testing.assert_close(collectives.gather_no_grad(rows), rows)
    assert len(seen) >= 5 and set(seen) == {collective_device()}


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv", "barrier"}


def test_only_core_collectives_calls_torch_distributed_collectives():
    """Every collective goes through vlp.core.collectives, which puts tensors on the collective
    device; a direct `dist.all_reduce(...)` elsewhere would bypass that (the NCCL bug class)."""
    offenders = []
    for folder in ("core", "models", "data_pipelines", "train"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.relative_to(REPO).as_posix() == "core/collectives.py":
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            aliases = {"torch.distributed", "dist"}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    aliases |= {alias.asname for alias in node.names if alias.name == "torch.distributed" and alias.asname}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                    owner = ast.unparse(node.func.value)
                    if owner in aliases or owner.startswith("torch.distributed"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{node.func.attr}")
    assert offenders == []


def test_rng_state_is_this_ranks_gpu_only(gpus, monkeypatch):
    """Saved: the rank's own GPU's state; restored onto the rank's own GPU, also from an older
    checkpoint that holds every visible GPU's state, and with fewer GPUs visible than at save."""
    from vlp.train import checkpoint

    gpus(1)
    states = {0: torch.tensor([7], dtype=torch.uint8)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    use_compute_device(torch.device("cuda", 0))
    saved = checkpoint.rng_state()
    assert torch.equal(saved["cuda"], states[0])
    checkpoint.set_rng_state(saved)
    assert restored == [(states[0], torch.device("cuda", 0))]
    # An old checkpoint saved on 8 visible GPUs, resumed by a rank that sees 1 (was an IndexError).
    old = {**saved, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    restored.clear()
    checkpoint.set_rng_state(old)
    assert torch.equal(restored[0][0], torch.tensor([0], dtype=torch.uint8))
    devices._compute_device = torch.device("cuda", 9)  # beyond what the old file holds: nothing to restore
    restored.clear()
    checkpoint.set_rng_state(old)
    assert restored == []
