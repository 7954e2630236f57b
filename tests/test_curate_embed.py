"""`vlp embed` and `vlp curate` end to end on tiny shards built here, with a tiny random model
exported in a fixture: rows and scores, resume after a failure mid-shard, the digests that refuse
another model's or another shard set's embeddings, bad input, and the curated shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_tar, tiny_config

from vlp.core.errors import VlpInputError
from vlp.curate import embed as embed_module
from vlp.curate.embed import embed_shards
from vlp.curate.run import curate
from vlp.data_pipelines.shards import write_shards
from vlp.data_pipelines.tar_reader import read_shard


def tiny_export(tmp_path, digits_dir, seed: int):
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(tiny_config(tmp_path, digits_dir))
    torch.manual_seed(seed)
    model = VLPModel(config.model)
    return export_model(model, config, tmp_path / f"export{seed}", "safetensors")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, digits_dir):
    return tiny_export(tmp_path_factory.mktemp("model"), digits_dir, seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, digits_dir):
    """Two shards of 24 real digits each; shard 1 also holds an exact copy of sample 0 of shard 0
    (planted last), a sample without caption, one with an empty caption, one with a corrupt image."""
    raw = [sample for _, sample in zip(range(48), read_shard(str(digits_dir / "digits-test-000000.tar")))]
    samples = [{"__key__": f"s{i:03d}", "png": sample["png"], "txt": sample["txt"].decode(), "cls": sample["cls"]}
               for i, sample in enumerate(raw)]
    planted = [{"__key__": "copy000", "png": samples[0]["png"], "txt": samples[0]["txt"]},
               {"__key__": "nocaption", "png": samples[1]["png"]},
               {"__key__": "empty", "png": samples[2]["png"], "txt": "   "},
               {"__key__": "corrupt", "png": b"not an image", "txt": "a photo of the number 3"}]
    out = tmp_path_factory.mktemp("shards")
    write_shards(samples[:24], out, "a", max_count=100)
    write_shards(samples[24:] + planted, out, "b", max_count=100)
    return out


def spec(folder) -> str:
    return f"{folder}/a-000000.tar::{folder}/b-000000.tar"


def table(out, name):
    return pq.read_table(out / "shards" / name / "table.parquet").to_pydict()


def test_embed_rows_scores_and_bad_samples(tmp_path, shards, model_dir):
    from vlp.models.dual_encoder import scoring_head
    from vlp.train.weights import load_model

    out = tmp_path / "emb"
    summary = embed_shards(spec(shards), model_dir, out, batch_size=5, workers=2, rank=0, world_size=1,
                           show_progress=False)
    assert summary["samples"] == 52 and summary["embedded"] == 49
    assert summary["bad"] == {"bad_image": 1, "empty_caption": 1, "missing_field": 1}
    second = table(out, "000001-b-000000")
    assert second["offset"] == list(range(28)) and second["key"][24:] == ["copy000", "nocaption", "empty", "corrupt"]
    assert second["status"][24:] == ["ok", "missing_field", "empty_caption", "bad_image"]
    first = table(out, "000000-a-000000")
    assert second["image_sha256"][24] == first["image_sha256"][0]

    # The stored score is the scoring head's own score of the sample, computed here independently.
    model, _ = load_model(model_dir)
    image = np.load(out / "shards" / "000000-a-000000" / "image.npy")
    assert image.dtype == np.float16 and image.shape == (24, model.config.embed_dim)
    sample = next(read_shard(str(shards / "a-000000.tar")))
    from PIL import Image
    import io

    pixels = model.image.preprocess(train=False)(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    with torch.no_grad():
        image_embed = model.encode_image(pixels[None])["image_embed"]
        text_embed = model.encode_text(model.text.tokenizer()([sample["txt"].decode()]))["text_embed"]
        expected = scoring_head(model).pairwise_scores(image_embed, text_embed)[0, 0].item()
    assert first["score"][0] == pytest.approx(expected, abs=1e-5)
    normed = torch.nn.functional.normalize(image_embed, dim=-1)[0].numpy()
    np.testing.assert_allclose(image[0].astype(np.float32), normed, atol=2e-3)


def test_embed_resumes_after_a_failure_mid_shard(tmp_path, shards, model_dir, monkeypatch):
    out = tmp_path / "emb"
    calls = {"saves": 0}
    real_save = np.save

    def failing_save(path, array):  # the second shard dies between its two arrays
        calls["saves"] += 1
        if calls["saves"] == 3:
            raise KeyboardInterrupt("killed")
        real_save(path, array)

    monkeypatch.setattr(embed_module.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        embed_shards(spec(shards), model_dir, out, batch_size=8, workers=0, rank=0, world_size=1, show_progress=False)
    monkeypatch.setattr(embed_module.np, "save", real_save)
    visible = sorted(path.name for path in (out / "shards").iterdir() if not path.name.startswith("."))
    assert visible == ["000000-a-000000"]  # the half-written shard is not there under its name
    done = (out / "shards" / "000000-a-000000" / "table.parquet").stat().st_mtime_ns

    summary = embed_shards(spec(shards), model_dir, out, batch_size=8, workers=0, rank=0, world_size=1,
                           show_progress=False)
    assert summary["shards_skipped"] == 1 and summary["shards_done"] == 1
    assert (out / "shards" / "000000-a-000000" / "table.parquet").stat().st_mtime_ns == done
    clean = tmp_path / "clean"
    embed_shards(spec(shards), model_dir, clean, batch_size=8, workers=0, rank=0, world_size=1, show_progress=False)
    for name in ("000000-a-000000", "000001-b-000000"):
        resumed, expected = table(out, name), table(clean, name)
        np.testing.assert_array_equal(resumed.pop("score"), expected.pop("score"))  # NaN where bad
        assert resumed == expected
        np.testing.assert_array_equal(np.load(out / "shards" / name / "text.npy"),
                                      np.load(clean / "shards" / name / "text.npy"))


def test_memory_holds_at_most_two_shards(tmp_path, digits_dir, model_dir, monkeypatch):
    """Rows of at most two shards are held at once (workers in step, one shard ahead at most),
    however many shards there are: memory does not grow with the dataset."""
    raw = [sample for _, sample in zip(range(60), read_shard(str(digits_dir / "digits-test-000000.tar")))]
    write_shards(({"__key__": f"m{i:03d}", "png": s["png"], "txt": s["txt"].decode()} for i, s in enumerate(raw)),
                 tmp_path / "many", "m", max_count=6)
    live = {"now": 0, "most": 0}
    real_init, real_write = embed_module.ShardRows.__init__, embed_module.ShardRows.write

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        live["now"] += 1
        live["most"] = max(live["most"], live["now"])

    def write(self, *args, **kwargs):
        live["now"] -= 1
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(embed_module.ShardRows, "__init__", init)
    monkeypatch.setattr(embed_module.ShardRows, "write", write)
    summary = embed_shards(str(tmp_path / "many"), model_dir, tmp_path / "emb", batch_size=2, workers=2, rank=0,
                           world_size=1, show_progress=False)
    assert summary["shards_done"] == 10 and summary["samples"] == 60
    assert live["most"] <= 2


def test_ranks_split_shards(tmp_path, shards, model_dir):
    out = tmp_path / "emb"
    first = embed_shards(spec(shards), model_dir, out, workers=0, rank=0, world_size=2, show_progress=False)
    second = embed_shards(spec(shards), model_dir, out, workers=0, rank=1, world_size=2, show_progress=False)
    assert (first["shards"], first["samples"]) == (1, 24) and (second["shards"], second["samples"]) == (1, 28)


def test_slurm_array_tasks_are_ranks():
    from vlp.curate.embed import rank_and_world

    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert rank_and_world(array) == (2, 0, 4)
    with_srun = {**array, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert rank_and_world(with_srun) == (5, 1, 8)


def test_other_model_or_shards_refused(tmp_path, shards, model_dir, digits_dir):
    out = tmp_path / "emb"
    embed_shards(spec(shards), model_dir, out, workers=0, rank=0, world_size=1, show_progress=False)
    other = tiny_export(tmp_path, digits_dir, seed=1)
    with pytest.raises(VlpInputError, match="embeddings of another model"):
        embed_shards(spec(shards), other, out, workers=0, rank=0, world_size=1, show_progress=False)
    with pytest.raises(VlpInputError, match="embeddings of another set of shards"):
        curate(f"{shards}/a-000000.tar", out, tmp_path / "cur")
    with pytest.raises(VlpInputError, match="holds the input shards"):
        curate(spec(shards), out, shards)
    (out / "shards" / "000001-b-000000").rename(out / "shards" / ".gone")
    with pytest.raises(VlpInputError, match="vlp embed has not finished"):
        curate(spec(shards), out, tmp_path / "cur")


def test_not_a_tar_and_missing_shard(tmp_path, shards, model_dir):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    summary = embed_shards(f"{shards}/a-000000.tar::{junk}", model_dir, tmp_path / "emb", workers=0, rank=0,
                           world_size=1, show_progress=False)
    assert summary["bad"] == {"bad_shard": 1} and summary["samples"] == 24
    report = curate(f"{shards}/a-000000.tar::{junk}", tmp_path / "emb", tmp_path / "cur")
    assert report["kept"] == 24 and str(junk) in report["bad_shards"]
    with pytest.raises(VlpInputError, match="not found"):
        embed_shards(f"{tmp_path}/missing.tar", model_dir, tmp_path / "emb2", workers=0, rank=0, world_size=1)


def test_curate_writes_shards_manifest_and_report(tmp_path, shards, model_dir):
    emb = tmp_path / "emb"
    embed_shards(spec(shards), model_dir, emb, workers=0, rank=0, world_size=1, show_progress=False)
    config = tmp_path / "c.yaml"
    config.write_text("curate:\n  dedup: {exact: true, threshold: null}\n")
    out = tmp_path / "cur"
    report = curate(spec(shards), emb, out, str(config))
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    reasons = dict(zip(manifest["key"], manifest["reason"]))
    assert reasons == {"copy000": "duplicate_exact", "nocaption": "missing_field", "empty": "empty_caption",
                       "corrupt": "bad_image"}
    assert manifest["duplicate_of"][manifest["key"].index("copy000")] == "s000"  # the earlier copy stays

    config.write_text("curate:\n  dedup: {exact: true, threshold: null}\n  score: {top_fraction: 0.9}\n")
    report = curate(spec(shards), emb, out, str(config), overwrite=True)
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    # ceil(0.9 * 49) = 45 best of the 49 embedded samples: 4 dropped for their score, first.
    assert report["dropped"]["low_score"]["count"] == 4
    assert report["dropped"]["missing_field"]["count"] == 1
    sizes = json.loads((out / "sizes.json").read_text())
    kept_keys = set()
    for name, count in sizes.items():
        written = read_tar(out / name)
        assert len(written) == count
        kept_keys |= set(written)
    assert len(kept_keys) == report["kept"] == 52 - len(manifest["key"])
    assert not kept_keys & set(manifest["key"])
    original = read_tar(shards / "a-000000.tar")
    for key, members in read_tar(out / "a-000000.tar").items():
        assert members == original[key]  # byte for byte
    assert (out / "scores.png").stat().st_size > 0
    with pytest.raises(VlpInputError, match="pass --overwrite"):
        curate(spec(shards), emb, out, str(config))


def test_command_line(tmp_path, shards, model_dir, capsys):
    """Both commands through vlp's own command line (`vlp.cli.main`): exit 0 with a JSON line,
    and bad input as one line with exit 2."""
    import vlp.cli

    run = vlp.cli.main

    emb = tmp_path / "emb"
    assert run(["embed", spec(shards), "--model", str(model_dir), "--out", str(emb), "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["embedded"] == 49
    assert run(["curate", spec(shards), "--embeddings", str(emb), "--out", str(tmp_path / "cur")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["kept"] == 49
    assert run(["curate", f"{shards}/a-000000.tar", "--embeddings", str(emb), "--out", str(tmp_path / "c2")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "embeddings of another set of shards" in error[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("curate:\n  dedup: {treshold: 0.9}\n")
    assert run(["curate", spec(shards), "--embeddings", str(emb), "--out", str(tmp_path / "c3"), "--config", str(bad)]) == 2
    assert "curate.dedup.treshold: unknown key" in capsys.readouterr().err
