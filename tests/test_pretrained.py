"""Pretrained weights in (issue 15): files written by open_clip / timm / transformers themselves
load into vlp with zero missing keys, and vlp's forward equals the library's own forward of the
same file to 1e-5. Nothing here touches the network: tags and `hf-hub:` names resolve through a
Hugging Face cache the test writes itself."""

from __future__ import annotations

import logging

import pytest
import torch

from vlp.models.dual_encoder import VLPModel
from vlp.models.pretrained import PretrainedError
from vlp.train.config import load_config

TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = ["a handwritten seven", "a photo of a cat on a mat", "the digit 3"]


def experiment(model: dict, **train) -> object:
    tree = {"name": "t", "data": {"train": [{"urls": "unused.tar"}]}, "model": model,
            "train": {"steps": 10, "batch_size": 2, **train}}
    return load_config(tree=tree)


def save_open_clip(model, path, layout):
    """A checkpoint as open_clip writes them: its training checkpoint (`state_dict` with the DDP
    `module.` prefix), a plain `torch.save(state_dict)` .bin, or safetensors."""
    state = model.state_dict()
    if layout == "pt":
        torch.save({"epoch": 1, "name": "test", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def assert_same_as_open_clip(reference, ours: VLPModel, image_size: int, token_ids: torch.Tensor):
    """Image / text embeddings and the zero-shot logits (scale * cosine [+ bias]) of open_clip's
    own forward and of vlp's, on the same input."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size)
    reference.eval(), ours.eval()
    with torch.no_grad():
        want_image, want_text = reference.encode_image(images), reference.encode_text(token_ids)
        got_image = ours.encode_image(images)["image_embed"]
        got_text = ours.encode_text(token_ids)["text_embed"]
        torch.testing.assert_close(got_image, want_image, **TOL)
        torch.testing.assert_close(got_text, want_text, **TOL)
        norm = torch.nn.functional.normalize
        want_logits = reference.logit_scale.exp() * norm(want_image, dim=-1) @ norm(want_text, dim=-1).T
        if getattr(reference, "logit_bias", None) is not None:
            want_logits = want_logits + reference.logit_bias
        head = next(iter(ours.objective.heads.values()))
        got_logits = head.scale() * head.pairwise_scores(got_image, got_text)
        if hasattr(head, "logit_bias"):
            got_logits = got_logits + head.logit_bias
        torch.testing.assert_close(got_logits, want_logits, **TOL)


@pytest.mark.slow  # three full-size builds: about a minute on 2 busy cores
@pytest.mark.parametrize("layout", ["pt", "bin", "safetensors"])
def test_open_clip_checkpoint_of_a_real_config_loads_exactly(tmp_path, layout):
    """ViT-S-32 at full size, saved in each of open_clip's checkpoint layouts."""
    import open_clip

    torch.manual_seed(0)
    path = tmp_path / f"weights.{layout}"
    save_open_clip(open_clip.create_model("ViT-S-32"), path, layout)
    reference = open_clip.create_model("ViT-S-32", pretrained=str(path))  # open_clip's own loading
    ours = VLPModel(experiment({"open_clip": {"name": "ViT-S-32", "pretrained": str(path)}}).model)  # strict
    tokenizer = ours.text.tokenizer()
    assert_same_as_open_clip(reference, ours, 224, tokenizer(PROMPTS))
    assert torch.equal(tokenizer(PROMPTS), open_clip.get_tokenizer("ViT-S-32")(PROMPTS))
    # Preprocessing is open_clip's own for the model: same tensor from the same picture.
    from PIL import Image

    picture = Image.new("RGB", (300, 200), (10, 200, 30))
    _, _, val = open_clip.create_model_and_transforms("ViT-S-32")
    assert torch.equal(ours.image.preprocess(train=False)(picture), val(picture))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_base", "ViT-B-16-SigLIP"])
def test_timm_based_and_siglip_open_clip_models_load_exactly(tmp_path, name):
    """A ConvNeXt (open_clip's TimmModel) and a SigLIP (CustomTextCLIP, logit bias: the siglip
    head is chosen and takes it) at full size."""
    import open_clip

    torch.manual_seed(0)
    path = tmp_path / "weights.safetensors"
    save_open_clip(open_clip.create_model(name), path, "safetensors")
    reference = open_clip.create_model(name, pretrained=str(path))
    config = experiment({"open_clip": {"name": name, "pretrained": str(path)}})
    assert list(config.model.heads_dict()) == (["siglip"] if "SigLIP" in name else ["clip"])
    ours = VLPModel(config.model)
    context = reference.context_length
    token_ids = torch.randint(1, 1000, (3, context))
    assert_same_as_open_clip(reference, ours, 224, token_ids)


def write_hub_cache(cache, repo_id: str, files: dict) -> None:
    """A Hugging Face hub cache entry as `hf_hub_download` leaves it (refs/main -> snapshot)."""
    import shutil

    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef")
    for name, source in files.items():
        shutil.copy(source, snapshot / name)


TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_hub_name_and_tag_resolve_from_the_local_cache_only(tmp_path, hub_cache):
    import json

    import open_clip

    torch.manual_seed(0)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    source = open_clip.create_model("local-dir:" + str(folder))
    save_open_clip(source, folder / "open_clip_model.safetensors", "safetensors")
    write_hub_cache(hub_cache, "vlp-test/tiny-clip", {
        "open_clip_config.json": folder / "open_clip_config.json",
        "open_clip_model.safetensors": folder / "open_clip_model.safetensors"})
    reference = open_clip.create_model("local-dir:" + str(folder))
    ours = VLPModel(experiment({"open_clip": {"name": "hf-hub:vlp-test/tiny-clip"}}).model)
    assert_same_as_open_clip(reference, ours, 32, ours.text.tokenizer()(PROMPTS))

    with pytest.raises(ValueError) as raised:  # a ConfigError: found while validating the config
        experiment({"open_clip": {"name": "hf-hub:vlp-test/not-cached"}})
    assert "not in the local Hugging Face cache" in str(raised.value) and "huggingface-cli download" in str(raised.value)


def test_uncached_tag_fails_in_one_line_naming_where_it_looked(hub_cache):
    config = experiment({"open_clip": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}})
    with pytest.raises(PretrainedError) as raised:
        VLPModel(config.model)
    message = str(raised.value)
    assert "\n" not in message
    assert str(hub_cache) in message and "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    assert "huggingface-cli download" in message


def test_unknown_tag_and_name_are_config_errors():
    from vlp.train.config import ConfigError

    with pytest.raises(ConfigError, match="not an open_clip model config"):
        experiment({"open_clip": {"name": "ViT-B-32x"}})
    with pytest.raises(PretrainedError, match="neither a file nor a pretrained tag of ViT-B-32"):
        VLPModel(experiment({"open_clip": {"name": "ViT-B-32", "pretrained": "laion9000"}}).model)


def small_open_clip_vit():
    return {"type": "open_clip_vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}


def small_open_clip_text():
    return {"type": "open_clip_text", "context_length": 16, "width": 32, "heads": 2, "layers": 2}


def test_per_tower_open_clip_pretrained_and_strictness(tmp_path, caplog):
    """`model.image.pretrained` / `model.text.pretrained` take an open_clip checkpoint (CLIP
    layout here); a file that lacks keys is a one-line error, or with strict: false a log line."""
    import json

    import open_clip

    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    torch.manual_seed(0)
    source = open_clip.create_model("local-dir:" + str(folder))
    path = tmp_path / "clip.pt"
    save_open_clip(source, path, "pt")
    reference = open_clip.create_model("local-dir:" + str(folder))
    open_clip.load_checkpoint(reference, str(path))
    model = {"embed_dim": 32, "image": {**small_open_clip_vit(), "pretrained": str(path)},
             "text": {**small_open_clip_text(), "pretrained": str(path)}, "heads": {"clip": {}}}
    ours = VLPModel(experiment(model).model)
    with torch.no_grad():
        ours.objective.heads["clip"].logit_scale.copy_(reference.logit_scale.reshape(1))
    assert_same_as_open_clip(reference, ours, 32, ours.text.tokenizer()(PROMPTS))

    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("visual.transformer.resblocks.1.")}
    torch.save(partial, tmp_path / "partial.bin")
    model["image"]["pretrained"] = str(tmp_path / "partial.bin")
    with pytest.raises(PretrainedError) as raised:
        VLPModel(experiment(model).model)
    assert "\n" not in str(raised.value) and "missing ['transformer.resblocks.1." in str(raised.value)
    model["image"]["strict"] = False
    with caplog.at_level(logging.WARNING, logger="vlp.pretrained"):
        VLPModel(experiment(model).model)
    assert "strict: false" in caplog.text and "transformer.resblocks.1.attn.in_proj_weight" in caplog.text


def test_timm_file_loads_by_timms_own_convention(tmp_path):
    """A timm weights file in the timm tower equals `timm.create_model(..., pretrained=True,
    pretrained_cfg_overlay=dict(file=...))`'s own forward; a file from another model is refused."""
    import timm
    from safetensors.torch import save_file

    from vlp.models.towers import IMAGE_TOWERS

    kwargs = dict(patch_size=8, depth=2, img_size=32)
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(path), num_classes=0), **kwargs).eval()
    cls = IMAGE_TOWERS.get("timm")
    tower = cls(cls.config_class(model_name="vit_tiny_patch16_224", image_size=32, pretrained=str(path),
                                 kwargs={"patch_size": 8, "depth": 2}), 16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = reference.forward_head(reference.forward_features(images), pre_logits=True)
        got = tower.trunk.forward_head(tower.trunk.forward_features(images), pre_logits=True)
    torch.testing.assert_close(got, want, **TOL)
    with pytest.raises(PretrainedError, match="weights do not fit the model: .*missing"):
        cls(cls.config_class(model_name="vit_tiny_patch16_224", image_size=32, pretrained=str(path),
                             kwargs={"patch_size": 8, "depth": 3}), 16)


def test_real_minilm_folder_loads_with_no_missing_keys():
    """The real MiniLM folder through transformers: strict passes (no missing / unexpected keys)
    and the tower's hidden states equal transformers' own forward."""
    from transformers import AutoModel

    from vlp.models.towers import TEXT_TOWERS
    from vlp.models.towers.text import minilm_path

    cls = TEXT_TOWERS.get("hf_text")
    tower = cls(cls.config_class(pretrained=minilm_path(), context_length=16), 16).eval()
    reference = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    ids = tower.tokenizer()(PROMPTS)
    mask = ids != tower.pad_id
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = tower._hidden(ids, mask)
    torch.testing.assert_close(got[mask], want[mask], **TOL)
    with pytest.raises(ValueError, match="contradicts model.text.path"):
        cls.config_class(pretrained=minilm_path(), path="/elsewhere")


def test_export_round_trip_then_init_from(tmp_path):
    """A vlp model exported to open_clip, then `train.init_from` that export: the fresh model's
    embeddings equal open_clip's forward of the export (and the original's)."""
    import open_clip
    import yaml

    from vlp.export import export_model
    from vlp.train.init_from import init_from

    model = {"embed_dim": 32, "image": small_open_clip_vit(), "text": small_open_clip_text(), "heads": {"clip": {}}}
    config = experiment(model)
    torch.manual_seed(0)
    original = VLPModel(config.model)
    export = export_model(original, config, tmp_path / "export", "open_clip")
    reference = open_clip.create_model("local-dir:" + str(export))
    torch.manual_seed(1)  # other random weights until init_from replaces them
    fresh = VLPModel(config.model)
    init_from(fresh, str(export))
    assert_same_as_open_clip(reference, fresh, 32, fresh.text.tokenizer()(PROMPTS))
    # The same export as `model.open_clip: {name: local-dir:EXPORT}`: open_clip's own loader.
    as_open_clip = VLPModel(experiment({"open_clip": {"name": f"local-dir:{export}"}}).model)
    assert_same_as_open_clip(reference, as_open_clip, 32, fresh.text.tokenizer()(PROMPTS))
    assert yaml.safe_load((tmp_path / "export" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 32
    broken = VLPModel(experiment({**model, "embed_dim": 16}).model)
    with pytest.raises(Exception, match="train.init_from|size mismatch"):
        init_from(broken, str(export))


def test_rebuilding_a_run_drops_every_weight_source_but_the_hf_folder():
    """load_model and frozen teachers rebuild a model from its saved config, then read the state
    dict: an open_clip tag, an open_clip or timm weights file may be gone by then (another
    machine, an expired cache), so `pretrained` goes; hf_text's names the folder the architecture
    and tokenizer come from, so it stays."""
    from vlp.export.frozen import model_without_pretrained
    from vlp.train.weights import without_pretrained_weights

    model = {"open_clip": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
             "image": {"type": "timm", "model_name": "vit_tiny_patch16_224", "pretrained": "/gone/model.safetensors"},
             "text": {"type": "hf_text", "pretrained": "/models/minilm"}}
    stripped = model_without_pretrained(model)
    assert stripped["open_clip"] == {"name": "ViT-B-32"}
    assert stripped["image"] == {"type": "timm", "model_name": "vit_tiny_patch16_224"}
    assert stripped["text"] == {"type": "hf_text", "pretrained": "/models/minilm"}
    assert model["image"]["pretrained"] == "/gone/model.safetensors"  # the caller's tree is not edited
    for image_type in ("open_clip", "open_clip_vit"):
        tree = {"seed": 1, "model": {"image": {"type": image_type, "pretrained": "/gone/open_clip_model.safetensors"}}}
        assert "pretrained" not in without_pretrained_weights(tree)["model"]["image"]
