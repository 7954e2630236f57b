"""`vlp segment` (train/segment.py): MONAI's UNETR from a vlp 3-D ViT export, Dice per lesion class
against MONAI's own, the three variants, and bad data named by sample (exit 2)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG
from torch.testing import assert_close

from vlp.core.errors import DataError
from vlp.train import segment as seg
from vlp.train import segment_cli

CLASSES = ["nodule", "cyst", "calcification", "mass", "fat"]


def _vlp_config(image: dict):
    from vlp.train.config import load_config

    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["name"] = "tiny_ct"
    tree["model"] = {"embed_dim": 16, "image": {"type": "monai_vit3d", "spacing": None, "hu_window": [-200.0, 400.0],
                                                **image},
                     "text": {"type": "open_clip_text", "context_length": 16, "width": 16, "heads": 2, "layers": 1},
                     "heads": {"ct_contrastive": {}}}
    tree["evals"], tree["export"] = [], []
    return load_config(tree=tree)


def _export(tmp_path, **image):
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel

    image = {"roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16, "mlp_dim": 32, "num_layers": 2,
             "num_heads": 2, **image}
    config = _vlp_config(image)
    torch.manual_seed(0)
    model = VLPModel(config.model)
    return export_model(model, config, tmp_path / "monai", "monai")


@pytest.fixture(scope="module")
def lesions(tmp_path_factory):
    from vlp.data_pipelines.sources import build

    out = tmp_path_factory.mktemp("ct_lesions")
    build("ct-lesions", out, train_size=12, test_size=6, size=16, spacing=8.0, seed=1, lesion_prob=0.9)
    return out


def _segment_config(tmp_path, encoder, lesions, **model):
    tree = {"name": "seg", "output_dir": str(tmp_path / "runs"),
            "data": {"train": str(lesions / "ct-lesions-train-000000.tar"), "test": str(lesions / "ct-lesions-test-000000.tar"),
                     "classes": CLASSES},
            "model": {"encoder": str(encoder), "feature_size": 4, **model},
            "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_batch_size": 3}}
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# ----------------------------------------------------------------------------- the network
def test_the_three_variants_start_from_the_export_or_not(tmp_path):
    encoder = seg.read_encoder(_export(tmp_path), tmp_path / "scratch")
    exported = encoder.state
    for variant in ("pretrained", "frozen", "scratch"):
        net, vit = seg.build_unetr(encoder, 5, seg.SegmentModelConfig(encoder="x", variant=variant, feature_size=4))
        same = all(torch.equal(vit.state_dict()[k], v) for k, v in exported.items())
        assert same == (variant != "scratch"), variant
        assert all(p.requires_grad == (variant != "frozen") for p in vit.parameters()), variant
        assert any(p.requires_grad for n, p in net.named_parameters() if "vit." not in n)
        logits = net(torch.randn(2, 1, 16, 16, 16))
        assert logits.shape == (2, 6, 16, 16, 16)


def test_a_unetr_shaped_tower_goes_into_monais_own_unetr(tmp_path):
    from monai.networks.nets import UNETR

    encoder = seg.read_encoder(_export(tmp_path, roi=[32, 32, 32], patch_size=[16, 16, 16], num_layers=12),
                               tmp_path / "scratch")
    net, vit = seg.build_unetr(encoder, 2, seg.SegmentModelConfig(encoder="x", feature_size=4))
    assert type(net) is UNETR and vit is net.vit
    assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_tower_unetr_with_sixteen_sized_patches_is_monais_unetr_forward():
    """TowerUNETR with MONAI's own shape (16^3 patches, 12 layers) computes what UNETR computes."""
    from monai.networks.nets import UNETR

    args = {"in_channels": 1, "img_size": [32, 32, 32], "patch_size": [16, 16, 16], "hidden_size": 16, "mlp_dim": 32,
            "num_layers": 12, "num_heads": 2, "proj_type": "conv", "classification": False, "spatial_dims": 3,
            "qkv_bias": False}
    torch.manual_seed(0)
    reference = UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=16, mlp_dim=32,
                      num_heads=2).eval()
    ours = seg.TowerUNETR(args, 3, 4, "instance").eval()
    ours.unetr.load_state_dict(reference.state_dict())
    volumes = torch.randn(2, 1, 32, 32, 32)
    assert_close(ours(volumes), reference(volumes))
    assert seg.skip_blocks(12) == (3, 6, 9) and seg.skip_blocks(4) == (1, 2, 3)


def test_unequal_patch_edges_and_a_bad_edge():
    args = {"in_channels": 1, "img_size": [32, 32, 16], "patch_size": [16, 16, 8], "hidden_size": 16, "mlp_dim": 32,
            "num_layers": 4, "num_heads": 2, "proj_type": "conv", "classification": False, "spatial_dims": 3}
    net = seg.TowerUNETR(args, 2, 4, "instance")
    assert net(torch.randn(1, 1, 32, 32, 16)).shape == (1, 2, 32, 32, 16)
    with pytest.raises(seg.ConfigError, match="8 or 16"):
        seg.TowerUNETR({**args, "patch_size": [4, 4, 4]}, 2, 4, "instance")


# ----------------------------------------------------------------------------- Dice
def test_dice_per_class_agrees_with_a_hand_computation_and_with_monai():
    from monai.metrics import compute_dice

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 1, 6, 6, 6), generator=generator)
    labels[3][labels[3] == 2] = 0  # class 2 absent from volume 3: it adds nothing to class 2
    logits = torch.randn(4, 3, 6, 6, 6, generator=generator)
    prediction = logits.argmax(1)

    class Fixed(torch.nn.Module):
        def forward(self, volumes):
            return logits[volumes[:, 0, 0, 0, 0].long()]

    index = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 1, 6, 6, 6)
    results = seg.evaluate(Fixed(), index, labels, ["a", "b"], batch_size=3)
    for c, name in ((1, "a"), (2, "b")):
        dices = []
        for v in range(4):
            truth, pred = labels[v, 0] == c, prediction[v] == c
            if truth.any():
                dices.append(2 * (truth & pred).sum().item() / (truth.sum() + pred.sum()).item())
        assert results[f"dice/{name}"] == pytest.approx(float(np.mean(dices)), abs=1e-6)
    one_hot = torch.nn.functional.one_hot
    monai = compute_dice(one_hot(prediction, 3).permute(0, 4, 1, 2, 3), one_hot(labels[:, 0], 3).permute(0, 4, 1, 2, 3),
                         include_background=False)  # (4, 2), NaN where a class is absent
    assert results["dice/a"] == pytest.approx(float(np.nanmean(monai[:, 0])), abs=1e-6)
    assert results["dice/b"] == pytest.approx(float(np.nanmean(monai[:, 1])), abs=1e-6)
    assert results["dice_mean"] == pytest.approx((results["dice/a"] + results["dice/b"]) / 2)


def test_lesion_instances_become_classes():
    mask = np.array([[[0, 1, 2, 2]]], dtype=np.int8)
    meta = {"lesions": [{"mask_value": 1, "kind": "mass"}, {"mask_value": 2, "kind": "nodule"}]}
    assert seg.lesion_labels(mask, meta, CLASSES, "s").tolist() == [[[0, 4, 1, 1]]]
    with pytest.raises(DataError, match="sample7: mask value 2 but its .json lists 1 lesion"):
        seg.lesion_labels(mask, {"lesions": meta["lesions"][:1]}, CLASSES, "sample7")
    with pytest.raises(DataError, match="lesion kind 'nodule'"):
        seg.lesion_labels(mask, meta, ["mass"], "s")


# ----------------------------------------------------------------------------- end to end
def test_a_few_steps_write_results_metrics_and_a_png(tmp_path, lesions):
    config = seg.load_segment_config(_segment_config(tmp_path, _export(tmp_path), lesions))
    results = seg.segment(config)
    run = tmp_path / "runs" / "seg"
    saved = json.loads((run / "results.json").read_text())
    assert saved["variant"] == "pretrained" and saved["steps"] == 3 and saved["train_samples"] == 12
    assert set(f"dice/{c}" for c in CLASSES) <= set(saved) and "dice_mean" in saved
    assert results["dice_mean"] == saved["dice_mean"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run / "plots" / "prediction.png").stat().st_size > 0
    with pytest.raises(seg.RunExists):
        seg.segment(config)


def test_the_encoder_may_be_a_run_checkpoint_or_export_of_vlp(tmp_path, lesions):
    """A safetensors export (the whole model) is exported to monai inside the run folder first."""
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel

    config = _vlp_config({"roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16, "mlp_dim": 32,
                          "num_layers": 1, "num_heads": 2})
    torch.manual_seed(0)
    model = VLPModel(config.model)
    whole = export_model(model, config, tmp_path / "whole", "safetensors")
    encoder = seg.read_encoder(whole, tmp_path / "run" / "encoder")
    assert (tmp_path / "run" / "encoder" / seg.MONAI_CONFIG).is_file()
    for name, tensor in model.image.monai_state_dict().items():
        assert torch.equal(encoder.state[name], tensor), name


def _shard_without_a_mask(lesions, tmp_path):
    source = lesions / "ct-lesions-test-000000.tar"
    out = tmp_path / "bad-000000.tar"
    with tarfile.open(source) as old, tarfile.open(out, "w") as new:
        for member in old.getmembers():
            if member.name.startswith("test000002.") and member.name.endswith(".mask.npy"):
                continue
            new.addfile(member, io.BytesIO(old.extractfile(member).read()))
    return out


def test_a_sample_without_a_mask_is_one_line_naming_it_and_exit_2(tmp_path, lesions, capsys):
    bad = _shard_without_a_mask(lesions, tmp_path)
    path = _segment_config(tmp_path, _export(tmp_path), lesions)
    code = segment_cli.main([str(path), f"data.test={bad}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "sample test000002 has no mask.npy" in err[0] and str(bad) in err[0]


def test_a_bad_variant_names_the_key(tmp_path, lesions, capsys):
    path = _segment_config(tmp_path, _export(tmp_path), lesions)
    assert segment_cli.main([str(path), "model.variant=pretrain"]) == 2
    assert "model.variant" in capsys.readouterr().err


def test_the_shipped_segmentation_configs_validate():
    """configs/segment/ (not configs/: tests/test_config.py reads every configs/*.yaml as an experiment)."""
    from pathlib import Path

    found = sorted((Path(__file__).resolve().parents[1] / "configs" / "segment").glob("*.yaml"))
    assert found
    for path in found:
        config = seg.load_segment_config(path)
        assert config.data.classes == CLASSES and config.model.variant == "pretrained"


def test_overrides_may_follow_the_seeds_and_variants():
    """`vlp segment CONFIG --seeds 0 1 2 model.encoder=DIR` (as docs/ct.md writes it) used to fail:
    argparse took the override for a seed (`invalid int value`)."""
    from vlp import cli

    parser = cli.build_parser()
    args = cli.parse_command_line(parser, ["segment", "c.yaml", "--seeds", "0", "1", "2", "model.encoder=runs/x/export/monai"])
    assert (args.seeds, args.variants, args.overrides) == ([0, 1, 2], ["pretrained", "scratch", "frozen"],
                                                           ["model.encoder=runs/x/export/monai"])
    args = cli.parse_command_line(parser, ["segment", "c.yaml", "a=1", "--variants", "scratch", "frozen", "b=2"])
    assert (args.seeds, args.variants, args.overrides) == (None, ["scratch", "frozen"], ["a=1", "b=2"])
    for bad in (["--seeds", "x"], ["--variants", "pretrain"], ["--seeds", "a=1"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_command_line(parser, ["segment", "c.yaml", *bad])
        assert exit_info.value.code == 2
