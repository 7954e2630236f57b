"""`vlp shards reinforce` end to end on tiny shards built here: every good sample copied byte for
byte with its teacher's embeddings beside it, sizes.json, resume per shard, ranks, the digests
that refuse another teacher, the training loader carrying the embeddings into batches, and a
short `vlp train` of the distill head reading them (no teacher loaded)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import read_tar, run_vlp, tiny_config

from vlp.core.errors import DataError
from vlp.curate.reinforce import reinforce_shards
from vlp.data_pipelines.collate import TEACHER_IMAGE, TEACHER_SCALE, TEACHER_TEXT, SamplePipeline
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.tar_reader import read_shard


def _export(tmp_path, digits_dir, seed: int):
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(tiny_config(tmp_path, digits_dir, name=f"teacher{seed}"))
    torch.manual_seed(seed)
    return export_model(VLPModel(config.model), config, tmp_path / f"export{seed}", "safetensors")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, digits_dir):
    return _export(tmp_path_factory.mktemp("teacher"), digits_dir, seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, digits_dir):
    """Two shards of 20 real digits each; shard b also holds a sample with an empty caption."""
    raw = [sample for _, sample in zip(range(40), read_shard(str(digits_dir / "digits-test-000000.tar")))]
    samples = [{"__key__": f"s{i:03d}", "png": s["png"], "txt": s["txt"].decode(), "cls": s["cls"]} for i, s in enumerate(raw)]
    out = tmp_path_factory.mktemp("shards")
    write_shards(samples[:20], out, "a", max_count=100)
    write_shards(samples[20:] + [{"__key__": "empty", "png": samples[0]["png"], "txt": "  "}], out, "b", max_count=100)
    return out


def spec(folder) -> str:
    return f"{folder}/a-000000.tar::{folder}/b-000000.tar"


def test_reinforced_shards_hold_every_good_sample_and_its_teacher_embeddings(tmp_path, shards, teacher_dir):
    from PIL import Image

    from vlp.train.weights import load_model

    out = tmp_path / "reinforced"
    summary = reinforce_shards(spec(shards), teacher_dir, out, batch_size=6, workers=2, rank=0, world_size=1,
                               show_progress=False)
    assert summary["samples"] == 40 and summary["shards_done"] == 2 and summary["left_out"] == {"empty_caption": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"a-000000.tar": 20, "b-000000.tar": 20}
    manifest = json.loads((out / "reinforce.json").read_text())
    assert manifest["embed_dim"] == 32 and manifest["model"] == str(teacher_dir)

    original, written = read_tar(shards / "b-000000.tar"), read_tar(out / "b-000000.tar")
    assert sorted(written) == sorted(key for key in original if key != "empty")
    for key, members in written.items():
        assert {ext: members[ext] for ext in original[key]} == original[key]  # byte for byte
        assert set(members) - set(original[key]) == {"teacher_image.npy", "teacher_text.npy", "teacher.json"}

    # The stored embeddings are the teacher's own, computed here independently (fp16 storage).
    model, _ = load_model(teacher_dir)
    members = written["s020"]
    pixels = model.image.preprocess(train=False)(Image.open(io.BytesIO(members["png"])).convert("RGB"))
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.encode_image(pixels[None])["image_embed"], dim=-1)[0]
        text = torch.nn.functional.normalize(
            model.encode_text(model.text.tokenizer()([members["txt"].decode()]))["text_embed"], dim=-1)[0]
    stored_image = np.load(io.BytesIO(members["teacher_image.npy"]))
    assert stored_image.dtype == np.float16 and stored_image.shape == (32,)
    np.testing.assert_allclose(stored_image.astype(np.float32), image.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.load(io.BytesIO(members["teacher_text.npy"])).astype(np.float32), text.numpy(), atol=2e-3)
    scale = json.loads(members["teacher.json"])["logit_scale"]
    assert scale == pytest.approx(float(model.objective.heads["clip"].scale().detach()), rel=1e-6)

    # The loaders' collate puts them into the batch, row i sample i.
    pipeline = SamplePipeline(preprocess=model.image.preprocess(train=False), tokenizer=model.text.tokenizer(), batch_size=4)
    items = [pipeline.decode(sample, 0) for sample in list(read_shard(str(out / "b-000000.tar")))[:4]]
    batch = pipeline.collate(items, __import__("collections").Counter(), set(), 0)
    assert batch[TEACHER_IMAGE].shape == (4, 32) and batch[TEACHER_TEXT].dtype == torch.float16
    assert torch.equal(batch[TEACHER_IMAGE][0], torch.from_numpy(stored_image)) and batch["key"][0] == "s020"
    assert batch[TEACHER_SCALE].tolist() == pytest.approx([scale] * 4)


def test_plain_shards_make_batches_without_teacher_keys(shards):
    from vlp.models.dual_encoder import VLPModel  # noqa: F401 (towers registered)
    from vlp.models.towers.image import ClipImageTransform
    from vlp.models.towers.text import OpenClipTokenizer

    pipeline = SamplePipeline(preprocess=ClipImageTransform(32, False, (0.5,) * 3, (0.5,) * 3),
                              tokenizer=OpenClipTokenizer(16), batch_size=2)
    items = [pipeline.decode(sample, 0) for sample in list(read_shard(str(shards / "a-000000.tar")))[:2]]
    batch = pipeline.collate(items, __import__("collections").Counter(), set(), 0)
    assert TEACHER_IMAGE not in batch and TEACHER_SCALE not in batch


def test_resume_skips_written_shards_and_ranks_split_them(tmp_path, shards, teacher_dir):
    out = tmp_path / "reinforced"
    first = reinforce_shards(spec(shards), teacher_dir, out, batch_size=8, workers=0, rank=1, world_size=2,
                             show_progress=False)
    assert first["shards_done"] == 1 and sorted(p.name for p in out.glob("*.tar")) == ["b-000000.tar"]
    second = reinforce_shards(spec(shards), teacher_dir, out, batch_size=8, workers=0, rank=0, world_size=1,
                              show_progress=False)
    assert second["shards_skipped"] == 1 and second["shards_done"] == 1
    assert json.loads((out / "sizes.json").read_text()) == {"a-000000.tar": 20, "b-000000.tar": 20}
    assert not list(out.glob(".*.tmp*"))
    again = reinforce_shards(spec(shards), teacher_dir, out, workers=0, rank=0, world_size=1, show_progress=False)
    assert again["shards_skipped"] == 2 and again["shards_done"] == 0


def test_another_teacher_or_the_input_folder_is_refused(tmp_path, shards, teacher_dir, digits_dir):
    out = tmp_path / "reinforced"
    reinforce_shards(f"{shards}/a-000000.tar", teacher_dir, out, workers=0, rank=0, world_size=1, show_progress=False)
    other = _export(tmp_path, digits_dir, seed=1)
    with pytest.raises(DataError, match="embeddings of another model"):
        reinforce_shards(f"{shards}/a-000000.tar", other, out, workers=0, rank=0, world_size=1, show_progress=False)
    with pytest.raises(DataError, match="holds the input shards"):
        reinforce_shards(f"{shards}/a-000000.tar", teacher_dir, shards, workers=0, rank=0, world_size=1,
                         show_progress=False)


def test_command_line_and_a_missing_teacher(tmp_path, shards, teacher_dir):
    out = tmp_path / "cli"
    proc = run_vlp("shards", "reinforce", spec(shards), "--teacher", teacher_dir, "--out", out, "--workers", "0")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["samples"] == 40
    missing = run_vlp("shards", "reinforce", spec(shards), "--teacher", tmp_path / "nowhere", "--out", out, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"vlp: error: --teacher: {tmp_path / 'nowhere'}: no such file or folder"


def test_vlp_train_distills_from_reinforced_shards_without_a_teacher(tmp_path, digits_dir, teacher_dir):
    """A few steps of `vlp train` with `teacher: {from_shards: true}` on reinforced digits shards."""
    out = tmp_path / "reinforced"
    reinforce_shards(str(digits_dir / "digits-train-000000.tar"), teacher_dir, out, workers=0, rank=0, world_size=1,
                     show_progress=False)
    config = tiny_config(tmp_path, digits_dir, name="distilled", train={"steps": 3, "checkpoint_every": 0})
    tree = yaml.safe_load(config.read_text())
    tree["data"]["train"] = [{"urls": str(out / "digits-train-000000.tar")}]
    tree["model"]["heads"] = {"clip": {}, "distill": {"teacher": {"from_shards": True}}}
    tree["evals"] = []
    config.write_text(yaml.safe_dump(tree))
    run_vlp("train", config)
    logged = [json.loads(line) for line in (tmp_path / "runs" / "distilled" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "loss/distill" in row]
    assert steps and all(np.isfinite(row["loss/distill"]) for row in steps)
    assert steps[-1]["distill/teacher_logit_scale"] == pytest.approx(
        json.loads((out / "reinforce.json").read_text())["logit_scale"], rel=1e-2)
