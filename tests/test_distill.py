"""The distill head: its loss against open_clip's DistillClipLoss and TinyCLIP's formula, its KL
logging, the frozen teacher kept out of the parameters (no optimizer state, no state dict), online
teachers from an export, and the one-line errors for a missing, unreadable or mismatched teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_config
from open_clip.loss import DistillClipLoss
from torch.testing import assert_close

from vlp.core.errors import ConfigError, DataError, ExportError, InputNotFound
from vlp.data_pipelines.collate import TEACHER_IMAGE, TEACHER_SCALE, TEACHER_TEXT
from vlp.models.heads import HEADS, HeadInputs
from vlp.models.heads.distill import DistillConfig, DistillHead, distill_loss, distill_loss_and_kl
from vlp.models.teacher import FrozenModelConfig

TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_distill_loss_equals_open_clip_distill_clip_loss_in_value_and_gradient():
    image, text = _unit(12, 16, seed=0).requires_grad_(), _unit(12, 16, seed=1).requires_grad_()
    teacher_image, teacher_text = _unit(12, 24, seed=2), _unit(12, 24, seed=3)  # another width is fine
    scale, teacher_scale = torch.tensor(14.0), torch.tensor(90.0)
    ours = distill_loss(image, text, scale, teacher_image, teacher_text, teacher_scale)
    ours_grads = torch.autograd.grad(ours, (image, text))
    image2, text2 = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    reference = DistillClipLoss()(image2, text2, scale, teacher_image, teacher_text, teacher_scale,
                                  output_dict=True)["distill_loss"]
    assert_close(ours, reference, **TOL)
    for got, want in zip(ours_grads, torch.autograd.grad(reference, (image2, text2))):
        assert_close(got, want, **TOL)


def _rank_case(rank: int, world_size: int) -> dict:
    """Each rank slices the same global features and runs ours (gathered by vlp's collectives)
    and open_clip's DistillClipLoss(local_loss=True, gather_with_grad=True) on its rows; -> the
    loss and the gradients of its features and of the student's scale, as numpy arrays."""
    from vlp.core.collectives import gather_no_grad, gather_with_grad

    rows = slice(rank * 3, (rank + 1) * 3)
    image, text = _unit(3 * world_size, 16, seed=10)[rows], _unit(3 * world_size, 16, seed=11)[rows]
    teacher_image, teacher_text = _unit(3 * world_size, 24, seed=12)[rows], _unit(3 * world_size, 24, seed=13)[rows]
    teacher_scale = torch.tensor(60.0)
    out = {}
    for name in ("ours", "open_clip"):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), torch.tensor(11.0, requires_grad=True)]
        if name == "ours":
            loss = distill_loss(*leaves, teacher_image, teacher_text, teacher_scale,
                                gathered_image=gather_with_grad(leaves[0]), gathered_text=gather_with_grad(leaves[1]),
                                gathered_teacher_image=gather_no_grad(teacher_image),
                                gathered_teacher_text=gather_no_grad(teacher_text), rank=rank)
        else:
            loss = DistillClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(
                *leaves, teacher_image, teacher_text, teacher_scale, output_dict=True)["distill_loss"]
        out[name] = [t.detach().numpy() for t in (loss, *torch.autograd.grad(loss, leaves))]
    return out


def test_distill_loss_matches_open_clip_on_two_gloo_ranks():
    from dist_utils import run_ranks

    for rank, results in enumerate(run_ranks(_rank_case, 2)):
        for ours, theirs, what in zip(results["ours"], results["open_clip"], ("loss", "image", "text", "scale")):
            assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), **TOL, msg=lambda m: f"rank {rank} {what}: {m}")


def test_distill_loss_is_tinyclip_affinity_mimicking_and_logs_the_kl():
    """TinyCLIP's ClipSoftLoss: cross-entropy against the teacher's softmax, written here with
    F.cross_entropy's probability targets; the logged KL is torch's kl_div of the same rows."""
    image, text = _unit(8, 16, seed=4), _unit(8, 16, seed=5)
    teacher_image, teacher_text = _unit(8, 16, seed=6), _unit(8, 16, seed=7)
    scale, teacher_scale = torch.tensor(20.0), torch.tensor(50.0)
    loss, kl = distill_loss_and_kl(image, text, scale, teacher_image, teacher_text, teacher_scale)
    student = [scale * image @ text.T, scale * text @ image.T]
    teacher = [teacher_scale * teacher_image @ teacher_text.T, teacher_scale * teacher_text @ teacher_image.T]
    tinyclip = sum(F.cross_entropy(s, t.softmax(-1)) for s, t in zip(student, teacher)) / 2
    assert_close(loss, tinyclip, **TOL)
    torch_kl = sum(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
                   for s, t in zip(student, teacher)) / 2
    assert_close(kl, torch_kl, **TOL)
    # A student that copies the teacher has KL 0 (and the cross-entropy is then the teacher's entropy).
    _, same = distill_loss_and_kl(teacher_image, teacher_text, teacher_scale, teacher_image, teacher_text, teacher_scale)
    assert abs(float(same)) < 1e-5


def test_head_reads_reinforced_batches_and_its_feature_term_needs_one_width():
    head = DistillHead(DistillConfig(teacher={"from_shards": True}, feature_weight=1.0), 16)
    image, text = _unit(4, 16, seed=8), _unit(4, 16, seed=9)
    batch = {TEACHER_IMAGE: image.half(), TEACHER_TEXT: text.half(), TEACHER_SCALE: torch.full((4,), 30.0)}
    local = {"image_normed": image, "text_normed": text}
    out = head(HeadInputs(local=local, gathered={}, batch=batch))
    assert float(out["logging"]["feature"]) < 1e-3  # the student equals the (fp16) teacher
    assert float(out["logging"]["teacher_logit_scale"]) == 30.0
    with pytest.raises(DataError, match=r"model\.heads\.distill\.teacher\.from_shards: the batch has no teacher_image_embed"):
        head(HeadInputs(local=local, gathered={}, batch={}))
    wide = {**batch, TEACHER_IMAGE: _unit(4, 8, seed=1), TEACHER_TEXT: _unit(4, 8, seed=2)}
    with pytest.raises(ValueError, match="feature_weight needs the teacher's width 8"):
        head(HeadInputs(local=local, gathered={}, batch=wide))


def test_teacher_config_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of export, open_clip and from_shards"):
        FrozenModelConfig(export="a", from_shards=True)
    with pytest.raises(ValueError, match="got none"):
        FrozenModelConfig()


# ------------------------------------------------------------------ online teachers
def _export(tmp_path, digits_dir, seed: int, name: str = "teacher", **model):
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(tiny_config(tmp_path, digits_dir, name=name), [f"model.{k}={v}" for k, v in model.items()])
    torch.manual_seed(seed)
    return export_model(VLPModel(config.model), config, tmp_path / f"export_{name}", "safetensors")


def _student(tmp_path, digits_dir, heads: dict, name: str = "student"):
    from vlp.train.config import load_config

    path = tiny_config(tmp_path, digits_dir, name=name)
    tree = yaml.safe_load(path.read_text())
    tree["model"]["heads"] = heads
    path.write_text(yaml.safe_dump(tree))
    return load_config(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, digits_dir):
    return _export(tmp_path_factory.mktemp("teacher"), digits_dir, seed=7)


def test_online_teacher_is_frozen_outside_the_parameters_and_the_optimizer(tmp_path, digits_dir, teacher_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.frozen import attach_frozen_models
    from vlp.train.trainer import build_optimizer

    def optimizer_params(heads):
        config = _student(tmp_path, digits_dir, heads)
        torch.manual_seed(0)
        model = VLPModel(config.model)
        attached = attach_frozen_models(model)
        params = [p for group in build_optimizer(model, config.train).param_groups for p in group["params"]]
        return model, attached, params

    _, _, plain = optimizer_params({"clip": {}})
    teacher = {"export": str(teacher_dir)}
    model, attached, frozen_temperature = optimizer_params({"clip": {}, "distill": {"teacher": teacher, "learn_temperature": False}})
    assert len(attached) == 1 and len(frozen_temperature) == len(plain)  # nothing of the teacher is optimized
    _, _, learned = optimizer_params({"clip": {}, "distill": {"teacher": teacher}})
    assert len(learned) == len(plain) + 1  # the head's own temperature only
    teacher_tensors = {id(p) for p in attached[0].model.parameters()}
    assert not teacher_tensors & {id(p) for p in model.parameters()}
    assert not any(name.startswith("objective.heads.distill.") and name != "objective.heads.distill.logit_scale"
                   for name in model.state_dict())
    assert all(not p.requires_grad for p in attached[0].model.parameters()) and not attached[0].model.training

    # One step: the loss reaches the student; the teacher's weights do not move and run in the
    # compute dtype on the features' device.
    before = {k: v.clone() for k, v in attached[0].model.state_dict().items()}
    batch = {"image": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8),
             "text": model.text.tokenizer()([f"a photo of the number {i}" for i in range(6)])}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["logging"]["loss/distill"]) and float(out["logging"]["distill/kl"]) >= -1e-5
    assert all(torch.equal(before[k], v) for k, v in attached[0].model.state_dict().items())
    model.to(torch.bfloat16)
    model(batch)
    assert next(attached[0].model.parameters()).dtype == torch.bfloat16


def test_online_teacher_embeddings_are_the_export_s_own(tmp_path, digits_dir, teacher_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.frozen import attach_frozen_models
    from vlp.train.weights import load_model

    config = _student(tmp_path, digits_dir, {"distill": {"teacher": {"export": str(teacher_dir)}}})
    reference, _ = load_model(teacher_dir)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    text = reference.text.tokenizer()(["a photo of the number 3"] * 4)
    model = VLPModel(config.model)
    attach_frozen_models(model)
    head = model.objective.heads["distill"]
    local = {"image_normed": torch.zeros(4, 32), "image_embed": torch.zeros(4, 32)}
    got = head.frozen_embeddings(local, {"image": images, "text": text})
    with torch.no_grad():
        want = F.normalize(reference.encode_image(images)["image_embed"], dim=-1)
    assert_close(got.local_image, want, **TOL)
    assert float(got.logit_scale) == pytest.approx(float(reference.objective.heads["clip"].scale().detach()), rel=1e-6)


def test_a_head_without_its_teacher_attached_says_how_to_attach_it(tmp_path, digits_dir, teacher_dir):
    from vlp.models.dual_encoder import VLPModel

    config = _student(tmp_path, digits_dir, {"clip": {}, "distill": {"teacher": {"export": str(teacher_dir)}}})
    model = VLPModel(config.model)
    batch = {"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "text": model.text.tokenizer()(["a", "b"])}
    with pytest.raises(RuntimeError, match=r"attach_frozen_models"):
        model(batch)


@pytest.mark.parametrize("case", ["missing", "not_an_export", "width", "tokenizer", "image"])
def test_bad_teachers_are_one_line_errors_naming_the_key(case, tmp_path, digits_dir, teacher_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.frozen import attach_frozen_models

    path, distill = str(teacher_dir), {}
    if case == "missing":
        path = str(tmp_path / "nowhere")
        error, message = InputNotFound, rf"model\.heads\.distill\.teacher\.export: {path}: no such file or folder"
    elif case == "not_an_export":
        (tmp_path / "junk").mkdir()
        path = str(tmp_path / "junk")
        error, message = ExportError, rf"model\.heads\.distill\.teacher\.export: {path}: not a run folder"
    elif case == "width":
        path, distill = str(_export(tmp_path, digits_dir, 1, "wide", embed_dim=48)), {"feature_weight": 1.0}
        error, message = ConfigError, r"model\.heads\.distill\.teacher: its embedding width 48 differs from model\.embed_dim 32"
    elif case == "tokenizer":
        path = str(_export(tmp_path, digits_dir, 1, "longer", **{"text.context_length": 24}))
        error, message = ConfigError, r"model\.heads\.distill\.teacher: its tokenizer differs from the student's"
    else:
        path = str(_export(tmp_path, digits_dir, 1, "bigger", **{"image.image_size": 48}))
        error, message = ConfigError, r"model\.heads\.distill\.teacher: its image input \(3, 48, 48\) differs"
    config = _student(tmp_path, digits_dir, {"clip": {}, "distill": {"teacher": {"export": path}, **distill}})
    with pytest.raises(error, match=message) as raised:
        attach_frozen_models(VLPModel(config.model))
    assert "\n" not in str(raised.value)


def test_a_teacher_of_another_width_is_fine_for_the_affinity_term(tmp_path, digits_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.frozen import attach_frozen_models

    wide = _export(tmp_path, digits_dir, 1, "wide", embed_dim=48)
    config = _student(tmp_path, digits_dir, {"clip": {}, "distill": {"teacher": {"export": str(wide)}}})
    model = VLPModel(config.model)
    attach_frozen_models(model)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
             "text": model.text.tokenizer()(["a photo of the number 1"] * 4)}
    assert torch.isfinite(model(batch)["loss"])


def test_registered():
    assert HEADS.get("distill") is DistillHead


# ------------------------------------------------------------------ under DeepSpeed
def _zero_stages(rank, world_size, stages, teacher: str, tmp):
    import os

    from vlp.train.config import load_config
    from vlp.train.frozen import attach_frozen_models
    from vlp.train.trainer import build_engine, build_model

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asks for it; launchers set it
    out = []
    for stage in stages:
        tree = {"name": "z", "output_dir": str(tmp), "data": {"train": [{"urls": "x.tar"}]},
                "train": {"steps": 3, "batch_size": 2, "fused_adamw": False},
                "deepspeed": {"zero_stage": stage},
                "model": {"embed_dim": 32, "heads": {"clip": {}, "distill": {"teacher": {"export": teacher}}},
                          "image": {"type": "open_clip_vit", "image_size": 32, "patch_size": 8, "width": 32,
                                    "layers": 1, "head_width": 16},
                          "text": {"type": "open_clip_text", "context_length": 16, "width": 32, "heads": 2, "layers": 1}}}
        config = load_config(tree=tree)
        model = build_model(config)
        [frozen] = attach_frozen_models(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        engine = build_engine(config, model)
        batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                 "text": torch.randint(1, 100, (2, 16))}
        engine.backward(engine(batch)["loss"])
        engine.step()
        inner = engine.optimizer
        while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
            inner = inner.optimizer
        state = sum(t.numel() for s in inner.state.values() for k, t in s.items() if torch.is_tensor(t) and k == "exp_avg")
        teacher_params = list(frozen.model.parameters())
        out.append({"trainable": trainable, "state": state,
                    "teacher_partitioned": any(hasattr(p, "ds_id") for p in teacher_params),
                    "teacher_grads": sum(p.grad is not None for p in teacher_params)})
    return out


@pytest.mark.slow
def test_online_teacher_gets_no_optimizer_state_and_no_partition_under_zero(tmp_path, digits_dir, teacher_dir):
    """ZeRO 0-3 on one gloo rank: the first moment holds the student's trainable parameters (the
    distill head's temperature included; ZeRO 1-3 pad their flat partitions a little), nothing of
    the teacher, which is never partitioned and gets no gradient."""
    from tests.dist_utils import run_ranks

    (per_stage,) = run_ranks(_zero_stages, 1, [0, 1, 2, 3], str(teacher_dir), tmp_path)
    for stage, row in zip([0, 1, 2, 3], per_stage):
        assert row["trainable"] <= row["state"] <= row["trainable"] + 64, (stage, row)
        assert not row["teacher_partitioned"] and row["teacher_grads"] == 0, (stage, row)


def test_vlp_train_distills_online_from_an_export(tmp_path, digits_dir, teacher_dir):
    """A few steps of `vlp train` with `teacher: {export: ...}`: the trainer attaches the teacher
    (`vlp.train.frozen.attach_frozen_models` in `train.trainer.build_model`) and the distill loss
    is logged; the run's checkpoint holds nothing of the teacher."""
    import json

    from conftest import run_vlp

    path = tiny_config(tmp_path, digits_dir, name="online", train={"steps": 3, "checkpoint_every": 0}, evals=[])
    tree = yaml.safe_load(path.read_text())
    tree["model"]["heads"] = {"clip": {}, "distill": {"teacher": {"export": str(teacher_dir)}}}
    tree["export"] = ["safetensors"]
    path.write_text(yaml.safe_dump(tree))
    run_vlp("train", path)
    run = tmp_path / "runs" / "online"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row for row in logged if "loss/distill" in row and row["loss/distill"] > 0]
    from safetensors.torch import load_file

    names = load_file(str(run / "export" / "safetensors" / "model.safetensors"))
    assert [name for name in names if name.startswith("objective.heads.distill.")] == ["objective.heads.distill.logit_scale"]


def test_an_open_clip_teacher_by_name(tmp_path):
    """`teacher: {open_clip: {name}}` builds open_clip's model (random weights without `pretrained`)
    with its own logit scale; a student with open_clip's tokenizer and image input passes the checks."""
    from vlp.models.config import validate_model_config
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.frozen import load_frozen_model

    frozen = load_frozen_model(FrozenModelConfig(open_clip={"name": "ViT-B-32"}), "model.heads.distill.teacher")
    assert frozen.embed_dim == 512 and frozen.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    student = VLPModel(validate_model_config({
        "embed_dim": 512, "heads": {"clip": {}},
        "image": {"type": "open_clip_vit", "image_size": 224, "patch_size": 32, "width": 32, "layers": 1, "head_width": 16},
        "text": {"type": "open_clip_text", "context_length": 77, "width": 32, "heads": 2, "layers": 1}}))
    frozen.check_against(student, same_width=True)
    with pytest.raises(ConfigError, match="its tokenizer differs"):
        frozen.check_against(VLPModel(validate_model_config({
            "embed_dim": 512, "heads": {"clip": {}},
            "image": {"type": "open_clip_vit", "image_size": 224, "patch_size": 32, "width": 32, "layers": 1, "head_width": 16},
            "text": {"type": "open_clip_text", "context_length": 16, "width": 32, "heads": 2, "layers": 1}})), False)
