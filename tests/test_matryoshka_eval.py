"""Matryoshka downstream: the zero-shot evaluator scores every prefix the clip head trained
(`zeroshot_top1@<dim>`), each against zero-shot computed here by hand on truncated and
re-normalised embeddings; the export's model card lists the dims, and a prefix taken from the
exported model (docs/export.md's recipe, in open_clip itself, and `vlp eval` on the export) scores
the same. The loss side (prefix losses per head) is tests/test_matryoshka.py's."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import fit_image_projection, tiny_config

from vlp.train.evals import EVALUATORS, EvalContext
from vlp.train.evals.zeroshot import ZeroShotConfig, resolve_names
from vlp.export import export_model
from vlp.train.weights import load_model

DIMS = [8, 16, 32]  # 32: the full embedding (tiny_config's embed_dim)
TEST = "digits-test-000000.tar"


def prefix_embeddings(embed: torch.Tensor, dim: int) -> torch.Tensor:
    """The `dim`-wide prefix (N, dim) of embeddings (N, E), re-normalised (docs/export.md)."""
    return F.normalize(embed[..., :dim].float(), dim=-1)


def hand_zeroshot_top1(image_embed, prompt_embed, labels, dim):
    """Top-1 of images (N, E) against prompts (C, T, E): each prompt's prefix re-normalised,
    averaged over templates and re-normalised (CLIP's ensemble, per prefix); cosine argmax."""
    classes = F.normalize(prefix_embeddings(prompt_embed, dim).mean(dim=1), dim=-1)  # (C, dim)
    predictions = (prefix_embeddings(image_embed, dim) @ classes.T).argmax(dim=1)
    return float((predictions == labels).double().mean())


def digits_test_split(model, digits_dir):
    """(images (N, 3, H, W), labels (N,)) of the digits test shard, as the evaluator reads them."""
    from vlp.data_pipelines.loader import build_eval_loader

    images, labels = [], []
    for batch in build_eval_loader(str(digits_dir / TEST), preprocess=model.image.preprocess(train=False),
                                   tokenizer=model.text.tokenizer(), batch_size=256):
        images.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def prompts(classnames, templates):
    return [t.replace("{c}", name) for name in classnames for t in templates]


@pytest.fixture(scope="module")
def mrl_model(tmp_path_factory, digits_dir):
    """A tiny CLIP with `matryoshka: {dims: DIMS}` on its clip head, its image projection fitted
    so each training digit points at its class's text embedding: real predictions, which differ
    between prefixes (untrained, it predicts one class for every image at every width)."""
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config
    from vlp.train.evals.common import class_embeddings

    tree = yaml.safe_load(tiny_config(tmp_path_factory.mktemp("mrl"), digits_dir).read_text())
    tree["model"]["heads"] = {"clip": {"weight": 1.0, "matryoshka": {"dims": DIMS}}}
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = VLPModel(config.model).eval()
    classnames, templates = resolve_names(ZeroShotConfig(data=str(digits_dir / TEST)))
    with torch.no_grad():
        classes = class_embeddings(model, classnames, templates, torch.device("cpu"))  # (C, E)
    fit_image_projection(model, str(digits_dir / "digits-train-000000.tar"), lambda labels: classes[labels])
    return model, config


def zeroshot(model, digits_dir, out_dir=None):
    config = ZeroShotConfig(data=str(digits_dir / TEST), batch_size=128)
    with torch.no_grad():
        return EVALUATORS.get("zeroshot")(config).run(model, EvalContext(out_dir=out_dir))


def test_zeroshot_scores_every_prefix_as_computed_by_hand(mrl_model, digits_dir, tmp_path):
    model, _ = mrl_model
    assert model.objective.heads.clip.matryoshka_dims() == tuple(DIMS)
    results = zeroshot(model, digits_dir, out_dir=tmp_path)
    assert {key for key in results if "@" in key} == {f"zeroshot_top1@{dim}" for dim in DIMS}
    # The full width is the plain classifier: the same predictions, so the same accuracy.
    assert results[f"zeroshot_top1@{DIMS[-1]}"] == results["zeroshot_top1"]
    assert (tmp_path / "zeroshot_matryoshka.png").is_file()

    classnames, templates = resolve_names(ZeroShotConfig(data=str(digits_dir / TEST)))
    images, labels = digits_test_split(model, digits_dir)
    with torch.no_grad():
        image_embed = model.encode_image(images)["image_embed"]  # (N, E)
        ids = model.text.tokenizer()(prompts(classnames, templates))
        prompt_embed = model.encode_text(ids)["text_embed"].reshape(len(classnames), len(templates), -1)  # (C, T, E)
    by_hand = {dim: hand_zeroshot_top1(image_embed, prompt_embed, labels, dim) for dim in DIMS}
    for dim in DIMS:
        assert results[f"zeroshot_top1@{dim}"] == pytest.approx(by_hand[dim], abs=1e-9), dim
    assert results["zeroshot_top1"] == pytest.approx(by_hand[DIMS[-1]], abs=1e-9)
    # The check can fail: the prefixes score differently from the full width (and above chance).
    assert len(set(by_hand.values())) > 1 and min(by_hand.values()) > 0.2


def test_no_prefix_metrics_without_matryoshka(mrl_model, digits_dir):
    from vlp.models.dual_encoder import VLPModel

    _, config = mrl_model
    plain = config.model.model_copy(deep=True)
    plain.heads.clip.matryoshka = None
    results = zeroshot(VLPModel(plain).eval(), digits_dir)
    assert "zeroshot_top1" in results and not any("@" in key for key in results)


def test_exported_model_lists_dims_and_serves_every_prefix(mrl_model, digits_dir, tmp_path):
    """The card lists the dims; docs/export.md's recipe (normalize(embed[..., :dim])) on the
    open_clip export, in open_clip itself, gives the prefix zero-shot vlp reports; and
    `vlp eval` on the export (load_model) reports the same prefix metrics."""
    import open_clip

    model, config = mrl_model
    out = export_model(model, config, tmp_path / "oc", "open_clip")
    card = json.loads((out / "model_card.json").read_text())
    assert card["matryoshka"]["dims"] == DIMS

    results = zeroshot(model, digits_dir)
    classnames, templates = resolve_names(ZeroShotConfig(data=str(digits_dir / TEST)))
    images, labels = digits_test_split(model, digits_dir)
    oc = open_clip.create_model(f"local-dir:{out}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        image_embed = oc.encode_image(images)
        prompt_embed = oc.encode_text(tokenizer(prompts(classnames, templates)))
    prompt_embed = prompt_embed.reshape(len(classnames), len(templates), -1)
    for dim in card["matryoshka"]["dims"]:
        assert hand_zeroshot_top1(image_embed, prompt_embed, labels, dim) == pytest.approx(
            results[f"zeroshot_top1@{dim}"], abs=1e-9), dim

    back, _ = load_model(out)
    reloaded = zeroshot(back, digits_dir)
    assert {key: value for key, value in reloaded.items() if "@" in key} == {
        key: value for key, value in results.items() if "@" in key}


def test_model_card_has_no_matryoshka_entry_without_it(tmp_path, digits_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    config = load_config(tree=yaml.safe_load(tiny_config(tmp_path, digits_dir).read_text()))
    out = export_model(VLPModel(config.model).eval(), config, tmp_path / "st", "safetensors")
    assert json.loads((out / "model_card.json").read_text())["matryoshka"] is None
