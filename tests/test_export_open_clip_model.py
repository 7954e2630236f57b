"""`model.open_clip: {name}` models (towers built by open_clip's own factory) export to open_clip:
the weights load with open_clip's loaders (by name with `pretrained=FILE`, and `local-dir:`),
strictly, and embed images and texts exactly as vlp does; the export reads back weight for weight."""

import json

import pytest
import torch
import yaml
from conftest import tiny_config

from vlp.export import ExportError, export_model
from vlp.train.weights import load_model

# The smallest open_clip config with a plain CLIP text tower (ViT-S/32, 384 wide); random weights,
# since pretrained tags need the Hugging Face cache.
NAME = "ViT-S-32"


@pytest.fixture(scope="module")
def open_clip_model(tmp_path_factory, digits_dir):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load(tiny_config(tmp_path_factory.mktemp("oc_model"), digits_dir).read_text())
    tree["model"] = {"open_clip": {"name": NAME}}
    config = load_config(tree=tree)
    torch.manual_seed(0)
    model = VLPModel(config.model).eval()
    with torch.no_grad():  # a scale open_clip's init (log(1/0.07)) would not give by chance
        model.objective.heads.clip.logit_scale.fill_(2.5)
    return model, config


def test_open_clip_model_loads_in_open_clip_with_identical_embeddings(open_clip_model, tmp_path):
    import open_clip

    model, config = open_clip_model
    assert config.model.image.type == config.model.text.type == "open_clip"
    out = export_model(model, config, tmp_path / "oc", "open_clip")
    written = json.loads((out / "open_clip_config.json").read_text())
    assert written["model_cfg"] == open_clip.get_model_config(NAME) and written["model_name"] == NAME
    # open_clip's preprocessing as its factory resolved it for the name (mean / std, 224 px).
    assert written["preprocess_cfg"] == json.loads(json.dumps(dict(model.image.model.preprocess_cfg)))
    assert written["preprocess_cfg"]["size"] == [224, 224]
    assert not (out / "vlp_extras.safetensors").exists()  # a clip-only model fits open_clip whole

    weights = str(out / "open_clip_model.safetensors")
    images = torch.randn(2, 3, 224, 224)
    ids = model.text.tokenizer()(["a photo of a dog", "x"])
    with torch.no_grad():
        want_image = model.encode_image(images)["image_embed"]
        want_text = model.encode_text(ids)["text_embed"]
        # open_clip's own class for the name (CLIP: the text tower flattened into it, not the
        # CustomTextCLIP layout vlp builds), by name and by `local-dir:`, both loading strictly.
        loaded = [open_clip.create_model(NAME, pretrained=weights), open_clip.create_model(f"local-dir:{out}")]
        for oc in loaded:
            oc.eval()
            torch.testing.assert_close(oc.encode_image(images), want_image, rtol=0, atol=1e-5)
            torch.testing.assert_close(oc.encode_text(ids), want_text, rtol=0, atol=1e-5)
            assert oc.logit_scale.ndim == 0 and float(oc.logit_scale) == pytest.approx(2.5)
    assert {type(oc).__name__ for oc in loaded} == {"CLIP"}
    assert torch.equal(open_clip.get_tokenizer(NAME)(["a photo of a dog", "x"]), ids)

    # And back: `vlp eval --checkpoint` on the export rebuilds our model, weight for weight.
    back, _ = load_model(out)
    back_state = back.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back_state[key], value, rtol=0, atol=0, msg=key)


def test_open_clip_model_export_refuses_two_open_clip_models(open_clip_model, tmp_path):
    model, config = open_clip_model
    mixed = config.model_copy(deep=True)
    mixed.model.text.name = "ViT-B-32"
    with pytest.raises(ExportError, match="two open_clip models"):
        export_model(model, mixed, tmp_path / "oc", "open_clip")
    assert not (tmp_path / "oc").exists()


def test_open_clip_model_export_reads_back_without_its_pretrained_weights(open_clip_model, tmp_path):
    """A run that started from a pretrained tag exports weights that replace the tag's: reading the
    export back must not need the tag's Hugging Face cache (absent here) again."""
    model, config = open_clip_model
    tagged = config.model_copy(deep=True)
    for section in (tagged.model.open_clip, tagged.model.image, tagged.model.text):
        section.pretrained = "laion2b_s34b_b79k"  # not in this machine's (empty) cache
    out = export_model(model, tagged, tmp_path / "st", "safetensors")
    back, back_config = load_model(out)
    assert back_config.model.open_clip.pretrained is None
    back_state = back.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back_state[key], value, rtol=0, atol=0, msg=key)
