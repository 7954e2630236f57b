"""Locked towers (LiT and partial locking, as open_clip's --lock-image / --lock-text), layer-wise
lr decay, the schedules, and W&B beside TensorBoard (issue 15)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import run_vlp, tiny_config
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS


def trainable(tower) -> set[str]:
    return {name for name, p in tower.named_parameters() if p.requires_grad}


def test_open_clip_vit_lock_leaves_the_last_groups_unlocked():
    """open_clip's VisionTransformer.lock groups: [embeddings, ln_pre], blocks..., [last block,
    ln_post], proj; unlocked_groups=2 leaves the last block, ln_post and proj trainable."""
    cls = IMAGE_TOWERS.get("open_clip_vit")
    small = dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16)
    full = cls(cls.config_class(**small, lock=True), 16)
    assert trainable(full) == set()
    partial = cls(cls.config_class(**small, lock=True, lock_unlocked_groups=2), 16)
    names = trainable(partial)
    assert "model.proj" in names and "model.ln_post.weight" in names
    assert any(n.startswith("model.transformer.resblocks.2.") for n in names)
    assert not any(n.startswith(("model.transformer.resblocks.1.", "model.conv1")) for n in names)
    with pytest.raises(ValueError, match="need lock: true"):
        cls.config_class(**small, lock_unlocked_groups=1)


def test_text_locks_open_clip_and_hf():
    # open_clip's text groups: embeddings, blocks..., [last block, ln_final], projection.
    cls = TEXT_TOWERS.get("open_clip_text")
    tower = cls(cls.config_class(context_length=16, width=32, heads=2, layers=3, lock=True, lock_unlocked_layers=2), 16)
    names = trainable(tower)
    assert "model.text_projection" in names and "model.ln_final.weight" in names
    assert any(n.startswith("model.transformer.resblocks.2.") for n in names)
    assert not any(n.startswith(("model.transformer.resblocks.1.", "model.token_embedding")) for n in names)
    hf = TEXT_TOWERS.get("hf_text")
    tower = hf(hf.config_class(context_length=16, lock=True, lock_unlocked_layers=1), 16)
    names = trainable(tower)
    assert any(n.startswith("model.encoder.layer.5.") for n in names)  # MiniLM: 6 layers
    assert not any(n.startswith(("model.encoder.layer.4.", "model.embeddings.")) for n in names)
    assert "proj.weight" in names  # the projection is never locked (open_clip's HF tower alike)


def test_timm_lock_with_frozen_batchnorm_stats():
    from torchvision.ops.misc import FrozenBatchNorm2d

    cls = IMAGE_TOWERS.get("timm")
    tower = cls(cls.config_class(model_name="resnet18", image_size=32, lock=True, lock_freeze_bn_stats=True), 16)
    assert trainable(tower) == {"proj.weight"}
    frozen = [m for m in tower.trunk.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not [m for m in tower.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_layer_decay_groups_follow_the_towers_depths():
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.trainer import build_optimizer

    tree = {"name": "t", "data": {"train": [{"urls": "x.tar"}]}, "train": {"steps": 10, "batch_size": 2},
            "model": {"embed_dim": 16, "heads": {"clip": {}},
                      "image": {"type": "open_clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                "head_width": 16, "lock": True, "lock_unlocked_groups": 1},
                      "text": {"type": "open_clip_text", "context_length": 16, "width": 32, "heads": 2, "layers": 2}}}
    model = VLPModel(load_config(tree=tree).model)
    tree["train"]["lr"], tree["train"]["layer_decay"] = 1e-3, {"image": 1.0, "text": 0.5}
    groups = build_optimizer(model, load_config(tree=tree).train).param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # text depths: embeddings 0, blocks 1..2, ln_final / projection 3 -> scale 0.5 ** (3 - d)
    assert by_param[id(names["text.model.token_embedding.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert by_param[id(names["text.model.transformer.resblocks.1.mlp.c_fc.weight"])]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_param[id(names["text.model.text_projection"])]["lr"] == pytest.approx(1e-3)
    # locked parameters are in no group: no optimizer state
    locked = {id(p) for n, p in names.items() if not p.requires_grad}
    assert locked and not locked & set(by_param)
    assert sum(len(g["params"]) for g in groups) == len(names) - len(locked)


def test_schedules_match_open_clips():
    from types import SimpleNamespace

    from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

    from vlp.train.schedule import lr_multiplier

    total, warmup, cooldown, lr = 50, 5, 10, 1e-3
    for schedule, theirs in [("cosine", lambda o: cosine_lr(o, lr, warmup, total)),
                             ("constant", lambda o: const_lr(o, lr, warmup, total)),
                             ("const-cooldown", lambda o: const_lr_cooldown(o, lr, warmup, total, cooldown, 2.0, 1e-4))]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        adjust = theirs(optimizer)
        train = SimpleNamespace(schedule=schedule, steps=total, warmup_steps=warmup, min_lr_ratio=0.0, lr=lr,
                                cooldown_steps=cooldown, lr_cooldown_end=1e-4, lr_cooldown_power=2.0)
        for step in range(total):
            want = adjust(step)
            assert lr * lr_multiplier(step, train) == pytest.approx(want, rel=1e-9, abs=1e-12), (schedule, step)


def test_schedule_knobs_are_checked():
    from vlp.train.config import ConfigError, load_config

    tree = {"name": "t", "data": {"train": [{"urls": "x.tar"}]}, "model": {"open_clip": {"name": "ViT-S-32"}},
            "train": {"steps": 10, "batch_size": 2, "cooldown_steps": 3}}
    with pytest.raises(ConfigError, match="cooldown_steps needs train.schedule: const-cooldown"):
        load_config(tree=tree)


def _optimizer_state_numel(rank, world_size, stages, tmp):
    return [_one_stage(stage, tmp) for stage in stages]


def _one_stage(stage, tmp):
    import os

    from vlp.train.config import load_config
    from vlp.train.trainer import build_engine, build_model

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it; launchers set it

    tree = {"name": "z", "output_dir": str(tmp), "data": {"train": [{"urls": "x.tar"}]},
            "train": {"steps": 3, "batch_size": 2, "fused_adamw": False},
            "deepspeed": {"zero_stage": stage},
            "model": {"embed_dim": 16, "heads": {"clip": {}},
                      "image": {"type": "open_clip_vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                "head_width": 16, "lock": True},
                      "text": {"type": "open_clip_text", "context_length": 16, "width": 32, "heads": 2, "layers": 2}}}
    config = load_config(tree=tree)
    model = build_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(config, model)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 100, (2, 16))}
    engine.backward(engine(batch)["loss"])
    engine.step()
    inner = engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    state = sum(t.numel() for s in inner.state.values() for k, t in s.items() if torch.is_tensor(t) and k == "exp_avg")
    locked_grads = [p.grad for n, p in model.named_parameters() if n.startswith("image.") and p.grad is not None]
    return trainable, state, len(locked_grads)


@pytest.mark.slow
def test_locked_tower_has_no_optimizer_state_under_zero(tmp_path):
    """Under ZeRO 0, 1, 2 and 3 the optimizer's first moment holds exactly the trainable
    parameters (ZeRO 1-3 may pad their flat partitions by a few elements per group), nothing for
    the locked image tower, whose parameters get no gradient. One gloo rank, the four stages in turn."""
    from tests.dist_utils import run_ranks

    (per_stage,) = run_ranks(_optimizer_state_numel, 1, [0, 1, 2, 3], tmp_path)
    for stage, (trainable, state, locked_grads) in zip([0, 1, 2, 3], per_stage):
        assert trainable <= state <= trainable + 64, (stage, trainable, state)
        assert locked_grads == 0, stage


@pytest.mark.slow
def test_lit_run_keeps_locked_weights_bit_identical(tmp_path, digits_dir):
    """`vlp train` from a safetensors export (`train.init_from`), image tower locked with its last
    group unlocked: the locked groups end bit-identical to the export, the unlocked group changed;
    the run logs to W&B offline beside TensorBoard."""
    from safetensors.torch import load_file

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.export import export_model
    from vlp.train.weights import read_state_dict

    config_path = tiny_config(tmp_path, digits_dir, name="lit")
    config = load_config(config_path)
    torch.manual_seed(5)
    export = export_model(VLPModel(config.model), config, tmp_path / "start", "safetensors")
    start = load_file(str(export / "model.safetensors"))
    run_vlp("train", config_path, f"train.init_from={export}", "model.image.lock=true",
            "model.image.lock_unlocked_groups=1", "train.schedule=constant", "logging.report_to=[tensorboard,wandb]",
            "logging.wandb.mode=offline", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    run_dir = tmp_path / "runs" / "lit"
    end, _ = read_state_dict(run_dir)
    locked = [k for k in start if k.startswith("image.") and not k.startswith(("image.model.transformer.resblocks.0.",
                                                                              "image.model.ln_post", "image.model.proj"))]
    assert locked and all(torch.equal(end[k], start[k]) for k in locked)
    assert not torch.equal(end["image.model.proj"], start["image.model.proj"])
    assert not torch.equal(end["text.model.token_embedding.weight"], start["text.model.token_embedding.weight"])
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(m["lr"], 5e-4) for m in metrics if "lr" in m and m["step"] > 20)
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].glob("*.wandb"))
