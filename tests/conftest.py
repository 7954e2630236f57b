import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess

import pytest
import yaml

DEMO_CONFIG = ROOT / "configs" / "demo.yaml"

# What an in-process `vlp train` / `vlp eval` leaves behind for the next test: the rendezvous
# variables `fill_env` sets (inherited by every later subprocess, which would then all bind one
# MASTER_PORT) and a live process group.
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_rendezvous_left_behind():
    before = {key: os.environ.get(key) for key in _RENDEZVOUS}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def read_tar(path) -> dict:
    """{key: {ext: bytes}} of one shard, read with plain tarfile (independent of our writer and loader)."""
    import tarfile

    samples: dict = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The real digits, built once per test session with the project's own source."""
    from vlp.data_pipelines.sources import build

    out = tmp_path_factory.mktemp("digits")
    build("digits", out, shard_size=400)
    return out


def tiny_config(tmp_path, digits_dir, name="tiny", **sections) -> Path:
    """A small CLIP config on the digits shards (seconds per step on CPU), written to tmp_path."""
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["name"] = name
    tree["output_dir"] = str(tmp_path / "runs")
    tree["data"] = {
        "train": [{"urls": str(digits_dir / "digits-train-{000000..000003}.tar")}],
        "workers": 0,
        "shuffle_buffer": 100,
    }
    tree["model"]["embed_dim"] = 32
    tree["model"]["image"].update(width=32, layers=1, head_width=16)
    tree["model"]["text"].update(width=32, layers=1, heads=2, context_length=16)
    tree["train"].update(steps=6, batch_size=8, warmup_steps=2, log_every=1, checkpoint_every=3)
    tree["evals"] = [{"type": "zeroshot", "data": str(digits_dir / "digits-test-000000.tar"), "batch_size": 128}]
    tree["export"] = []
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section].update(values)
        else:
            tree[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_vlp(*args, timeout=600, env=None, check=True) -> subprocess.CompletedProcess:
    """`vlp ...` in a fresh process (the trainer owns a process group; keep it out of pytest)."""
    import os
    import sys

    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "vlp.cli", *map(str, args)],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vlp {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def rerun_from_checkpoint(config, runs: Path, name: str, final: str, restart_at: str) -> Path:
    """A copy of the finished run folder `runs/name` rewound to checkpoint `restart_at` (the
    final checkpoint `final` removed, `latest` pointing back), then resumed with `vlp train
    --resume latest` to the end. Returns the copy's checkpoints folder, for comparing its
    `final` checkpoint with the uninterrupted run's."""
    import shutil

    resumed_runs = runs.parent / "resumed"
    shutil.copytree(runs, resumed_runs)
    checkpoints = resumed_runs / name / "checkpoints"
    shutil.rmtree(checkpoints / final)
    (checkpoints / "latest").write_text(restart_at + "\n")
    run_vlp("train", config, f"output_dir={resumed_runs}", "--resume", "latest")
    return checkpoints


def fit_image_projection(model, train_spec, targets_for):
    """Set an (untrained, tiny) open_clip ViT tower's image projection by least squares so each
    training image's embedding lands on `targets_for(labels)` (N,) -> (N, E): tests use it to
    give a tiny model real predictions that two evaluators could disagree on."""
    import torch

    from vlp.data_pipelines.loader import build_eval_loader

    vit = model.image.model
    with torch.no_grad():
        vit.proj.copy_(torch.eye(vit.proj.shape[0]))  # (W, E) with W == E: pooled features as they are
        features, labels = [], []
        for batch in build_eval_loader(train_spec, preprocess=model.image.preprocess(train=False),
                                       tokenizer=model.text.tokenizer(), batch_size=256):
            features.append(model.encode_image(batch["image"])["image_embed"])
            labels.append(batch["label"])
        features, labels = torch.cat(features), torch.cat(labels)
        vit.proj.copy_(torch.linalg.lstsq(features, targets_for(labels)).solution)
