"""Export round trips: a real 2-rank ZeRO-3 checkpoint -> open_clip (loaded by open_clip itself,
scored by clip_benchmark's own zero-shot code), timm (create_model / load_checkpoint), MONAI
(ViT, UNETR), safetensors; and loading refuses pickled code."""

import json
import math
import sys
import types

import pytest
import torch
import yaml
from conftest import fit_image_projection, run_vlp, tiny_config

from vlp.train.checkpoint_io import CheckpointReadError
from vlp.export import EXPORTERS, ExportError, export_model
from vlp.export.base import sha256
from vlp.train.weights import consolidate, export_checkpoint, load_model, read_state_dict


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, digits_dir):
    """A tiny CLIP trained 4 steps on 2 gloo ranks with ZeRO-3 (sharded weights and optimizer),
    evaluated zero-shot and by retrieval every 2 steps, on every rank, on its partitioned model."""
    tmp = tmp_path_factory.mktemp("zero3")
    test_split = str(digits_dir / "digits-test-000000.tar")
    evals = [{"type": "zeroshot", "data": test_split, "batch_size": 128, "every": 2},
             {"type": "retrieval", "data": test_split, "batch_size": 128, "every": 2}]
    config = tiny_config(tmp, digits_dir, train={"steps": 4, "checkpoint_every": 4, "warmup_steps": 1},
                         deepspeed={"zero_stage": 3}, evals=evals)
    run_vlp("train", config, "--nproc", "2")
    return tmp / "runs" / "tiny"


def fit_class_projection(model, train_spec, classnames, templates):
    """Give an (untrained, tiny) model real zero-shot predictions: each training digit's embedding
    points at its class's text embedding. Untrained, the tiny model predicts one class for every
    image, and two evaluators agreeing on that could not fail."""
    from vlp.train.evals.common import class_embeddings

    with torch.no_grad():
        classes = class_embeddings(model, classnames, templates, torch.device("cpu"))  # (C, E)
    fit_image_projection(model, train_spec, lambda labels: classes[labels])


def model_from_tree(tree):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    torch.manual_seed(0)
    config = load_config(tree=tree)
    return VLPModel(config.model).eval(), config


def tiny_tree(tmp_path, digits_dir, **model):
    tree = yaml.safe_load(tiny_config(tmp_path, digits_dir).read_text())
    tree["model"].update(model)
    return tree


def open_clip_embeddings(folder, images, texts):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        return model.eval(), model.encode_image(images), model.encode_text(tokenizer(texts)), tokenizer(texts)


# ----------------------------------------------------------------------------- ZeRO-3 -> open_clip
@pytest.mark.slow  # a 2-rank ZeRO-3 training run
def test_zero3_checkpoint_consolidates_to_the_trained_model(zero3_run, tmp_path):
    tag_dir = zero3_run / "checkpoints" / "step_00000004"
    assert len(list(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # really sharded
    state = consolidate(zero3_run / "checkpoints", "step_00000004")
    assert all(v.numel() > 0 for v in state.values())
    records = [json.loads(line) for line in (zero3_run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/retrieval_t2i_r1" in r}
    assert sorted(evals) == [2, 4]  # periodic evaluation ran on both ranks, both evaluators
    # The trainer scored its live ZeRO-3 model; the consolidated weights must score the same.
    trained = json.loads((zero3_run / "results.json").read_text())
    data = yaml.safe_load((zero3_run / "config.yaml").read_text())["evals"][0]["data"]
    for task, keys in (("zeroshot", ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall")),
                       ("retrieval", ("retrieval_i2t_r1", "retrieval_i2t_r10", "retrieval_t2i_r5"))):
        out = tmp_path / f"{task}.json"
        proc = run_vlp("eval", task, "--checkpoint", zero3_run, "--data", data, "--out", out)
        assert proc.stdout.strip().splitlines()[-1] == out.read_text().strip()  # one JSON line last
        assert "| metric | value |" in proc.stdout
        evaluated = json.loads(out.read_text())
        for key in keys:
            assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key


@pytest.mark.slow  # a 2-rank ZeRO-3 training run
def test_open_clip_export_loads_with_identical_embeddings(zero3_run, tmp_path):
    import open_clip

    out = export_checkpoint(zero3_run, tmp_path / "oc", "open_clip")
    card = json.loads((out / "model_card.json").read_text())
    assert card["samples_seen"] == 4 * 16 and "zeroshot_top1" in card["eval_results"]
    for name, info in card["files"].items():
        assert sha256(out / name) == info["sha256"], name
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert set(cfg) == {"model_cfg", "preprocess_cfg"} and cfg["model_cfg"]["embed_dim"] == 32
    assert not (out / "vlp_extras.safetensors").exists()  # a clip-only model fits open_clip whole

    ours, _ = load_model(zero3_run)
    images = torch.randn(3, 3, 32, 32)
    texts = ["a photo of the number 3", "a handwritten seven", "x"]
    model, image_embed, text_embed, ids = open_clip_embeddings(out, images, texts)
    # Zero missing / unexpected keys (open_clip also loads strictly itself).
    from safetensors.torch import load_file

    fresh = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    result = fresh.load_state_dict(load_file(str(out / "open_clip_model.safetensors")), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        torch.testing.assert_close(image_embed, ours.encode_image(images)["image_embed"], rtol=0, atol=1e-5)
        torch.testing.assert_close(text_embed, ours.encode_text(ids)["text_embed"], rtol=0, atol=1e-5)
    assert model.logit_scale.ndim == 0
    assert float(model.logit_scale.detach()) == pytest.approx(float(ours.objective.heads.clip.logit_scale.detach()), abs=1e-6)
    # An open_clip export reads back as our model, weight for weight.
    back, _ = load_model(out)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


def numpy2_safe_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy`, with `.item()` where it calls float() on a 1-element array
    (an error under NumPy 2)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


@pytest.mark.slow  # a 2-rank ZeRO-3 training run
def test_clip_benchmark_agrees_with_vlp_eval(zero3_run, tmp_path, digits_dir, monkeypatch):
    """clip_benchmark's own wds loader, classifier and metrics on the open_clip export, over the
    digits test split in clip_benchmark's layout, against `vlp eval zeroshot` on the checkpoint."""
    from test_eval import clip_benchmark_layout

    # clip_benchmark imports `requests` for dataset downloads only; it is not installed here.
    monkeypatch.setitem(sys.modules, "requests", sys.modules.get("requests", types.ModuleType("requests")))
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification
    from clip_benchmark.models import load_clip

    from vlp.train.evals.zeroshot import ZeroShotConfig, resolve_names

    monkeypatch.setattr(zeroshot_classification, "accuracy", numpy2_safe_accuracy)
    wds = clip_benchmark_layout(digits_dir, tmp_path / "wds")
    ours_model, config = load_model(zero3_run)
    names = resolve_names(ZeroShotConfig(data=str(wds / "test" / "0.tar")))
    fit_class_projection(ours_model, str(digits_dir / "digits-train-{000000..000003}.tar"), *names)
    checkpoint = export_model(ours_model, config, tmp_path / "st", "safetensors")
    export = export_model(ours_model, config, tmp_path / "oc", "open_clip")
    model, transform, tokenizer = load_clip("open_clip", f"local-dir:{export}", None, None, device="cpu")
    dataset = build_dataset("wds/digits", root=str(wds), transform=transform, split="test", download=False)
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, shuffle=False, num_workers=0)
    loader.dataset.classes, loader.dataset.templates = dataset.classes, dataset.templates
    theirs = zeroshot_classification.evaluate(model.eval(), loader, tokenizer, dataset.classes, dataset.templates,
                                              "cpu", amp=False)
    out = tmp_path / "vlp.json"
    run_vlp("eval", "zeroshot", "--checkpoint", checkpoint, "--data", wds / "test" / "0.tar", "--out", out)
    ours = json.loads(out.read_text())
    print(f"clip_benchmark {theirs} vs vlp {ours}")
    assert 0.15 < ours["zeroshot_top1"] < 0.99  # predictions that could disagree
    assert abs(theirs["acc1"] - ours["zeroshot_top1"]) <= 0.005
    assert abs(theirs["acc5"] - ours["zeroshot_top5"]) <= 0.005
    assert abs(theirs["mean_per_class_recall"] - ours["zeroshot_mean_per_class_recall"]) <= 0.005


# ----------------------------------------------------------------------------- other heads
def test_siglip_scalars_become_open_clip_zero_dim(tmp_path, digits_dir):
    tree = tiny_tree(tmp_path, digits_dir, heads={"siglip": {"init_logit_bias": -7.5}})
    model, config = model_from_tree(tree)
    with torch.no_grad():
        model.objective.heads.siglip.logit_scale.fill_(math.log(300.0))  # above the clamp at 100
    out = export_model(model, config, tmp_path / "oc", "open_clip")
    oc, image_embed, _, _ = open_clip_embeddings(out, torch.randn(2, 3, 32, 32), ["a"])
    assert oc.logit_bias.ndim == 0 and float(oc.logit_bias.detach()) == pytest.approx(-7.5)
    assert float(oc.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-5)  # the scale we trained with


def test_meru_exports_towers_plus_extras(tmp_path, digits_dir):
    from safetensors.torch import load_file

    tree = tiny_tree(tmp_path, digits_dir, heads={"meru": {}})
    model, config = model_from_tree(tree)
    out = export_model(model, config, tmp_path / "oc", "open_clip")
    extras = load_file(str(out / "vlp_extras.safetensors"))
    info = json.loads((out / "vlp_extras.json").read_text())
    assert {"objective.heads.meru.log_curv", "objective.heads.meru.alpha_image"} <= set(extras)
    assert info["scoring_head"] == "meru" and info["open_clip_scores_like_vlp"] is False
    images = torch.randn(2, 3, 32, 32)
    _, image_embed, _, _ = open_clip_embeddings(out, images, ["a"])
    with torch.no_grad():
        torch.testing.assert_close(image_embed, model.encode_image(images)["image_embed"], rtol=0, atol=1e-5)
    back, _ = load_model(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_open_clip_refuses_towers_it_cannot_hold(tmp_path, digits_dir):
    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir, image=TIMM_IMAGE))
    with pytest.raises(ExportError, match="TimmModel cannot pass timm kwargs"):
        export_model(model, config, tmp_path / "oc", "open_clip")
    assert not (tmp_path / "oc").exists() and not list(tmp_path.glob(".oc.*"))  # nothing half-written
    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir, image=MONAI_IMAGE))
    with pytest.raises(ExportError, match="needs open_clip_vit \\(or timm\\) \\+ open_clip_text"):
        export_model(model, config, tmp_path / "oc", "open_clip")


def test_timm_tower_exports_as_open_clip_timm_model(tmp_path, digits_dir):
    image = {"type": "timm", "model_name": "test_vit", "image_size": 160}
    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir, image=image))
    out = export_model(model, config, tmp_path / "oc", "open_clip")
    images = torch.randn(2, 3, 160, 160)
    oc, image_embed, text_embed, ids = open_clip_embeddings(out, images, ["a digit", "b"])
    with torch.no_grad():
        torch.testing.assert_close(image_embed, model.encode_image(images)["image_embed"], rtol=0, atol=1e-5)
        torch.testing.assert_close(text_embed, model.encode_text(ids)["text_embed"], rtol=0, atol=1e-5)
    back, _ = load_model(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------- timm
TIMM_IMAGE = {"type": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32,
              "kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}}


def test_timm_export_loads_in_timm(tmp_path, digits_dir):
    import timm

    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir, image=TIMM_IMAGE))
    out = export_model(model, config, tmp_path / "timm", "timm")
    meta = json.loads((out / "config.json").read_text())
    weights = str(out / "model.safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.image.trunk.forward_head(model.image.trunk.forward_features(images), pre_logits=True)
    # 1) create_model(pretrained=True) from the file, with a new 10-class head for fine-tuning.
    fine = timm.create_model(meta["architecture"], pretrained=True, num_classes=10,
                             pretrained_cfg_overlay=dict(file=weights, num_classes=0), **meta["model_args"])
    # 2) load_checkpoint into a model built without weights: only the classifier is missing.
    plain = timm.create_model(meta["architecture"], pretrained=False, num_classes=10, **meta["model_args"])
    result = timm.models.load_checkpoint(plain, weights, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []
    with torch.no_grad():
        for loaded in (fine.eval(), plain.eval()):
            got = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert loaded(images).shape == (2, 10)


# ----------------------------------------------------------------------------- MONAI
MONAI_IMAGE = {"type": "monai_vit3d", "roi": [32, 32, 32], "patch_size": [16, 16, 16], "hidden_size": 32,
               "mlp_dim": 64, "num_layers": 12, "num_heads": 2, "spacing": None}


def test_monai_export_loads_into_vit_and_unetr(tmp_path, digits_dir):
    from monai.networks.nets import UNETR, ViT
    from safetensors.torch import load_file

    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir, image=MONAI_IMAGE))
    out = export_model(model, config, tmp_path / "monai", "monai")
    meta = json.loads((out / "monai_vit_config.json").read_text())
    weights = load_file(str(out / "monai_vit.safetensors"))
    vit = ViT(**meta["vit_args"]).eval()
    vit.load_state_dict(weights, strict=True)
    volumes = torch.randn(2, 1, 32, 32, 32)
    # vlp's blocks run attention through SDPA, MONAI's default ViT through its einsum path: the
    # same maths, apart by float rounding (1.2e-6 seen), hence 1e-5 as in the SDPA tests.
    with torch.no_grad():
        hidden, _ = vit(volumes)  # (B, P, W) after the final norm
        _, tokens = model.image.features(volumes)
        torch.testing.assert_close(hidden, tokens, rtol=0, atol=1e-5)
    assert meta["unetr_compatible"]
    unetr = UNETR(out_channels=3, feature_size=8, **meta["unetr_args"]).eval()
    unetr.vit.load_state_dict(weights, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(unetr.vit(volumes)[0], tokens, rtol=0, atol=1e-5)
        assert unetr(volumes).shape == (2, 3, 32, 32, 32)


# ----------------------------------------------------------------------------- safetensors, safety
def test_safetensors_round_trip_and_card(tmp_path, digits_dir):
    model, config = model_from_tree(tiny_tree(tmp_path, digits_dir))
    out = export_model(model, config, tmp_path / "st", "safetensors", results={"zeroshot_top1": 0.5}, samples_seen=7)
    card = json.loads((out / "model_card.json").read_text())
    assert card["samples_seen"] == 7 and card["eval_results"] == {"zeroshot_top1": 0.5}
    assert card["config"]["model"]["embed_dim"] == 32
    assert set(card["files"]) == {"model.safetensors", "config.yaml"}
    back, _ = load_model(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert sorted(EXPORTERS.names()) == ["monai", "open_clip", "safetensors", "timm"]


class NotAWeight:  # any class a checkpoint could smuggle in
    pass


def test_loading_refuses_pickled_objects(tmp_path):
    tag = tmp_path / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [], "evil": NotAWeight()},
               tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": 1}, "evil": NotAWeight()},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointReadError, match="refusing to unpickle.*NotAWeight"):
        consolidate(tmp_path / "checkpoints", "step_00000001")
    (tag / "COMPLETE").write_text("ok\n")
    with pytest.raises(ExportError, match="config.yaml: missing"):
        read_state_dict(tmp_path / "checkpoints" / "step_00000001")
    with pytest.raises(ExportError, match="not a run folder, checkpoint"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_zero_run_exports_the_fp32_master_weights(tmp_path, digits_dir, zero_stage):
    """bf16 with ZeRO 1/2: the module holds bf16 copies; the export must be the optimizer's fp32
    master weights (what the final checkpoint's zero_to_fp32 merge holds), not their rounding."""
    config = tiny_config(tmp_path, digits_dir, train={"steps": 2, "warmup_steps": 0, "checkpoint_every": 0},
                         deepspeed={"zero_stage": zero_stage, "precision": "bf16"}, evals=[],
                         export=["safetensors"])
    run_vlp("train", config)
    run = tmp_path / "runs" / "tiny"
    master = consolidate(run / "checkpoints", (run / "checkpoints" / "latest").read_text().strip())
    exported, _ = read_state_dict(run / "export" / "safetensors")
    off_the_bf16_grid = 0
    for key, weight in master.items():
        if not weight.is_floating_point():
            continue
        torch.testing.assert_close(exported[key].float(), weight, rtol=0, atol=0, msg=key)
        off_the_bf16_grid += int((weight != weight.bfloat16().float()).any())
    assert off_the_bf16_grid > 0  # the master weights are not bf16 values: the test can tell them apart
