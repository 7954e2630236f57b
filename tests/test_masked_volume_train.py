"""Masked volume modelling through `vlp train`: a run interrupted and resumed ends with the
uninterrupted run's weights and mask step bit for bit (the masks are keyed by the head's seed and
step buffers, which the checkpoint carries). A tiny ct-lesions split, the real trainer."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import DEMO_CONFIG, rerun_from_checkpoint, run_vlp

from vlp.train.weights import consolidate

pytestmark = pytest.mark.slow


def _config(tmp_path, data_dir):
    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["name"] = "mae"
    tree["output_dir"] = str(tmp_path / "runs")
    tree["data"] = {"train": [{"urls": str(data_dir / "ct-lesions-train-000000.tar")}], "workers": 0,
                    "shuffle_buffer": 8}
    tree["model"] = {
        "embed_dim": 16,
        "image": {"type": "monai_vit3d", "roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16,
                  "mlp_dim": 32, "num_layers": 1, "num_heads": 2, "spacing": None, "hu_window": [-200.0, 400.0]},
        "text": {"type": "open_clip_text", "context_length": 32, "width": 16, "heads": 2, "layers": 1},
        "heads": {"ct_contrastive": {},
                  "masked_volume": {"patch_size": [8, 8, 8], "decoder_dim": 8, "decoder_heads": 2}},
    }
    tree["train"].update(steps=6, batch_size=4, warmup_steps=2, log_every=1, checkpoint_every=3, keep_checkpoints=3,
                         lr=5e-3)
    tree["evals"], tree["export"] = [], []
    path = tmp_path / "mae.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_resume_with_the_masked_pass_is_bit_identical(tmp_path):
    from vlp.data_pipelines.sources import build

    data_dir = tmp_path / "data"
    build("ct-lesions", data_dir, train_size=16, test_size=1, size=16, spacing=8.0, seed=1)
    config = _config(tmp_path, data_dir)
    run_vlp("train", config)
    reference = consolidate(tmp_path / "runs" / "mae" / "checkpoints", "step_00000006")

    checkpoints = rerun_from_checkpoint(config, tmp_path / "runs", "mae", "step_00000006", "step_00000003")
    resumed = consolidate(checkpoints, "step_00000006")
    assert int(reference["objective.heads.masked_volume.mask_step"]) == 6
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)
