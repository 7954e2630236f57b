"""The compat head (BCT's influence loss against a frozen old model) and the compat evaluator
(new/old image embeddings against new/old text embeddings), checked against open_clip's ClipLoss
and against vlp's own zero-shot evaluator."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_config
from open_clip.loss import ClipLoss
from torch.testing import assert_close

from vlp.core.errors import ConfigError, ExportError, InputNotFound
from vlp.data_pipelines.collate import TEACHER_IMAGE, TEACHER_SCALE, TEACHER_TEXT
from vlp.models.heads import HeadInputs
from vlp.models.heads.compat import CompatConfig, CompatHead, compat_loss_and_accuracy
from vlp.train.evals import EVALUATORS, EvalContext
from vlp.train.evals.compat import ranks_of_positives

TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_compat_loss_is_two_open_clip_losses_through_the_old_embeddings():
    image, text = _unit(10, 16, seed=0).requires_grad_(), _unit(10, 16, seed=1).requires_grad_()
    old_image, old_text = _unit(10, 16, seed=2).requires_grad_(), _unit(10, 16, seed=3).requires_grad_()
    scale = torch.tensor(30.0)
    loss, accuracy_new_old, _ = compat_loss_and_accuracy(image, text, old_image, old_text, scale)
    reference = (ClipLoss()(image, old_text, scale) + ClipLoss()(old_image, text, scale)) / 2
    assert_close(loss, reference, **TOL)
    loss.backward()
    assert image.grad is not None and text.grad is not None
    assert old_image.grad is None and old_text.grad is None  # the old model is frozen
    assert float(accuracy_new_old) == float(((image @ old_text.T).argmax(1) == torch.arange(10)).float().mean())


def test_head_reads_the_old_embeddings_from_reinforced_batches():
    head = CompatHead(CompatConfig(old={"from_shards": True}), 16)
    assert not list(head.parameters())
    image, text = _unit(4, 16, seed=4), _unit(4, 16, seed=5)
    # The old model's caption embedding of each sample is the new image embedding itself.
    batch = {TEACHER_IMAGE: text.half(), TEACHER_TEXT: image.half(), TEACHER_SCALE: torch.full((4,), 50.0)}
    out = head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered={}, batch=batch))
    assert float(out["logging"]["old_logit_scale"]) == 50.0
    assert float(out["logging"]["accuracy_new_image_old_text"]) == 1.0
    assert float(out["logging"]["accuracy_old_image_new_text"]) == 1.0
    narrow = {**batch, TEACHER_IMAGE: _unit(4, 8, seed=6), TEACHER_TEXT: _unit(4, 8, seed=7)}
    with pytest.raises(ValueError, match=r"model\.heads\.compat\.old: the old embeddings are 8 wide"):
        head(HeadInputs(local={"image_normed": image, "text_normed": text}, gathered={}, batch=narrow))


def test_ranks_of_positives_counts_only_non_positives_above_the_best_positive():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.2, 0.3, 0.4, 0.5]])
    positive = torch.tensor([[False, True, True, False], [True, False, False, True]])
    assert ranks_of_positives(scores, positive).tolist() == [1, 0]


# ------------------------------------------------------------------ against an old model
def _export(tmp_path, digits_dir, seed: int, name: str, **model):
    from vlp.export import export_model
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(tiny_config(tmp_path, digits_dir, name=name), [f"model.{k}={v}" for k, v in model.items()])
    torch.manual_seed(seed)
    model_ = VLPModel(config.model)
    return model_, export_model(model_, config, tmp_path / f"export_{name}", "safetensors")


def _compat(options: dict):
    cls = EVALUATORS.get("compat")
    return cls(cls.config_class(**{"type": "compat", "batch_size": 64, **options}))


def test_evaluator_pairings_match_the_zero_shot_evaluator_and_each_model_alone(tmp_path, digits_dir):
    new, _ = _export(tmp_path, digits_dir, 0, "new")
    old, old_dir = _export(tmp_path, digits_dir, 1, "old")
    data = str(digits_dir / "digits-test-000000.tar")
    with torch.no_grad():
        results = _compat({"old": str(old_dir), "data": data}).run(new.eval(), EvalContext())
        zeroshot = EVALUATORS.get("zeroshot")
        alone = {name: zeroshot(zeroshot.config_class(type="zeroshot", data=data, batch_size=64)).run(model, EvalContext())
                 for name, model in (("new", new), ("old", old))}
    assert results["compat_zeroshot_top1_new_new"] == pytest.approx(alone["new"]["zeroshot_top1"], abs=1e-9)
    assert results["compat_zeroshot_top1_old_old"] == pytest.approx(alone["old"]["zeroshot_top1"], abs=1e-9)
    for metric in ("zeroshot_top1", "i2t_r1", "t2i_r5"):
        assert {f"compat_{metric}_{i}_{t}" for i in ("new", "old") for t in ("new", "old")} <= set(results)
    assert results["compat_samples"] == alone["new"]["zeroshot_samples"]

    # Against itself (its own export as the old model), every pairing is the same number.
    _, new_dir = _export(tmp_path, digits_dir, 0, "new_again")
    with torch.no_grad():
        same = _compat({"old": str(new_dir), "data": data, "tasks": ["retrieval"]}).run(new, EvalContext())
    values = {same[f"compat_i2t_r1_{i}_{t}"] for i in ("new", "old") for t in ("new", "old")}
    assert len(values) == 1 and "compat_zeroshot_top1_new_new" not in same


@pytest.mark.parametrize("case", ["missing", "not_an_export", "width"])
def test_bad_old_models_are_one_line_errors(case, tmp_path, digits_dir):
    new, _ = _export(tmp_path, digits_dir, 0, "new")
    if case == "missing":
        path, error, message = tmp_path / "nowhere", InputNotFound, r"compat\.old: .*nowhere: no such file or folder"
    elif case == "not_an_export":
        (tmp_path / "junk").mkdir()
        path, error, message = tmp_path / "junk", ExportError, r"compat\.old: .*junk: not a safetensors or open_clip export"
    else:
        _, path = _export(tmp_path, digits_dir, 1, "wide", embed_dim=48)
        error, message = ConfigError, r"compat\.old: .*: embedding width 48 differs from the new model's 32"
    with pytest.raises(error, match=message):
        _compat({"old": str(path), "data": str(digits_dir / "digits-test-000000.tar")}).run(new, EvalContext())


def test_online_compat_head_against_an_export(tmp_path, digits_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.frozen import attach_frozen_models

    _, old_dir = _export(tmp_path, digits_dir, 1, "old")
    path = tiny_config(tmp_path, digits_dir, name="new")
    tree = yaml.safe_load(path.read_text())
    tree["model"]["heads"] = {"clip": {}, "compat": {"old": {"export": str(old_dir)}}}
    path.write_text(yaml.safe_dump(tree))
    model = VLPModel(load_config(path).model)
    [frozen] = attach_frozen_models(model)
    batch = {"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
             "text": model.text.tokenizer()(["a photo of the number 2"] * 4)}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["logging"]["loss/compat"])
    assert float(out["logging"]["compat/old_logit_scale"]) == pytest.approx(frozen.logit_scale)
    assert all(p.grad is None for p in frozen.model.parameters())
