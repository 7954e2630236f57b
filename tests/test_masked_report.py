"""The masked report head (models/heads/masked_report.py): masks keyed per sample, the loss on the
masked tokens only, no masked word reaching the decoder, and where its gradient goes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from vlp.core.errors import ConfigError
from vlp.models.heads.base import HeadInputs
from vlp.models.heads.masked_report import (
    MaskedReportConfig,
    MaskedReportHead,
    keyed_token_masks,
    maskable_positions,
)

E = 16
VOCAB = 50


def _ids(generator=None) -> torch.Tensor:
    """(4, 10) ids: start 1, words, end 2, padding 0; rows of 8, 5, 3 and 10 tokens."""
    generator = generator or torch.Generator().manual_seed(0)
    lengths = [8, 5, 3, 10]
    ids = torch.zeros(4, 10, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=generator)
        ids[row, 0], ids[row, n - 1] = 1, 2
    return ids


def _head(**overrides) -> MaskedReportHead:
    torch.manual_seed(0)
    config = MaskedReportConfig(**{"vocab_size": VOCAB, "decoder_dim": 16, "decoder_heads": 2, **overrides})
    return MaskedReportHead(config, E)


def _inputs(batch: dict, generator=None, masked_tokens: torch.Tensor | None = None) -> HeadInputs:
    generator = generator or torch.Generator().manual_seed(1)
    b = batch["text"].shape[0]
    local = {"image_embed": torch.randn(b, E, generator=generator),
             "image_tokens": torch.randn(b, 6, E, generator=generator)}
    if masked_tokens is not None:
        local["masked_text_tokens"] = masked_tokens
    return HeadInputs(local=local, gathered={}, batch=batch)


# ----------------------------------------------------------------------------- masks
def test_masks_skip_padding_and_the_start_and_end_tokens_and_follow_the_ratio():
    ids = _ids()
    maskable = maskable_positions(ids != 0)
    assert maskable.sum(1).tolist() == [6, 3, 1, 8]
    assert not maskable[:, 0].any() and not maskable[torch.arange(4), torch.tensor([7, 4, 2, 9])].any()
    masked = keyed_token_masks(["a", "b", "c", "d"], maskable, seed=3, step=0, ratio=0.5)
    assert (masked <= maskable).all()
    assert masked.sum(1).tolist() == [3, 2, 1, 4]  # round(0.5 n), at least 1 (round(1.5) = 2)


def test_a_samples_mask_depends_on_its_key_and_step_not_on_its_place_in_the_batch():
    ids = _ids()
    maskable = maskable_positions(ids != 0)
    keys = ["k0", "k1", "k2", "k3"]
    masked = keyed_token_masks(keys, maskable, seed=7, step=5, ratio=0.5)
    order = [3, 1, 0, 2]
    shuffled = keyed_token_masks([keys[i] for i in order], maskable[order], seed=7, step=5, ratio=0.5)
    assert torch.equal(shuffled, masked[order])
    alone = keyed_token_masks(keys[3:], maskable[3:], seed=7, step=5, ratio=0.5)  # another rank's share
    assert torch.equal(alone, masked[3:])
    assert not torch.equal(keyed_token_masks(keys, maskable, seed=7, step=6, ratio=0.5), masked)
    assert not torch.equal(keyed_token_masks(keys, maskable, seed=8, step=5, ratio=0.5), masked)


def test_the_head_draws_a_new_mask_each_training_step_and_none_in_eval():
    head = _head()
    batch = {"text": _ids(), "key": ["k0", "k1", "k2", "k3"]}
    first = head.token_masks(batch)
    head(_inputs(batch))
    assert int(head.mask_step) == 1
    assert not torch.equal(head.token_masks(batch), first)
    head.eval()
    head(_inputs(batch))
    assert int(head.mask_step) == 1
    # The seed and step are state: a copy of the state draws the same masks (exact resume).
    twin = _head()
    twin.load_state_dict(head.state_dict())
    assert torch.equal(twin.token_masks(batch), head.token_masks(batch))


def test_without_keys_a_row_is_keyed_by_its_own_tokens():
    head = _head()
    ids = _ids()
    masked = head.token_masks({"text": ids})
    assert torch.equal(head.token_masks({"text": ids[[2, 0]]}), masked[[2, 0]])


# ----------------------------------------------------------------------------- loss
@pytest.mark.parametrize("vocabulary", ["full", "batch"])
def test_the_loss_is_the_cross_entropy_of_the_masked_tokens_only(vocabulary):
    head = _head(vocabulary=vocabulary)
    batch = {"text": _ids(), "key": ["k0", "k1", "k2", "k3"]}
    inputs = _inputs(batch)
    masked = head.token_masks(batch)
    loss = head(inputs)["loss"]
    # Reference: the decoder states of the same pass, scored by hand over the candidate ids.
    _, states = head.fuse(inputs.local["image_embed"], inputs.local["image_tokens"], batch["text"], masked=masked)
    logits = head.predict(states)  # (B, L, V)
    if vocabulary == "batch":
        candidates = torch.unique(batch["text"][batch["text"] != 0])
        allowed = torch.full((VOCAB,), float("-inf"))
        allowed[candidates] = 0.0
        logits = logits + allowed
    expected = F.cross_entropy(logits[masked], batch["text"][masked])
    assert_close(loss, expected)


def test_no_masked_word_reaches_the_decoder():
    """Changing the ids at masked positions changes the targets, never the decoder's states."""
    head = _head()
    batch = {"text": _ids(), "key": ["k0", "k1", "k2", "k3"]}
    inputs = _inputs(batch)
    masked = head.token_masks(batch)
    other = batch["text"].clone()
    other[masked] = (other[masked] + 7) % (VOCAB - 3) + 3
    _, states = head.fuse(inputs.local["image_embed"], inputs.local["image_tokens"], batch["text"], masked=masked)
    _, states_other = head.fuse(inputs.local["image_embed"], inputs.local["image_tokens"], other, masked=masked)
    assert_close(states_other, states)
    # ... while a visible word does reach it.
    visible = batch["text"].clone()
    visible[0, 0] = 5
    _, states_visible = head.fuse(inputs.local["image_embed"], inputs.local["image_tokens"], visible, masked=masked)
    assert not torch.allclose(states_visible, states)


def test_the_visible_patch_tokens_are_used_when_the_masked_pass_ran():
    head = _head()
    batch = {"text": _ids(), "key": ["k0", "k1", "k2", "k3"]}
    inputs = _inputs(batch)
    inputs.local["visible_image_tokens"] = torch.randn(4, 2, E, requires_grad=True)
    inputs.local["image_tokens"].requires_grad_()
    head(inputs)["loss"].backward()
    assert inputs.local["visible_image_tokens"].grad.abs().sum() > 0
    assert inputs.local["image_tokens"].grad is None
    full = _head(volume_tokens="full")
    inputs = _inputs(batch)
    inputs.local["visible_image_tokens"] = torch.randn(4, 2, E, requires_grad=True)
    inputs.local["image_tokens"].requires_grad_()
    full(inputs)["loss"].backward()
    assert inputs.local["visible_image_tokens"].grad is None and inputs.local["image_tokens"].grad.abs().sum() > 0


def test_an_id_beyond_the_vocabulary_names_the_key():
    head = _head(vocab_size=10)
    with pytest.raises(ConfigError, match="model.heads.masked_report.vocab_size=10"):
        head(_inputs({"text": _ids(), "key": ["k0", "k1", "k2", "k3"]}))


# ----------------------------------------------------------------------------- text towers
def _tower_step(tower, head: MaskedReportHead, reports: list[str]):
    ids = tower.tokenizer()(reports)
    batch = {"text": ids, "key": [f"r{i}" for i in range(len(reports))]}
    masked_ids = head.masked_text(batch)
    assert ((masked_ids == 0) | (masked_ids == ids)).all()
    assert (masked_ids != ids).sum() == head.token_masks(batch).sum()
    tokens = tower(masked_ids)["text_tokens"]  # the model's masked text pass
    out = head(_inputs(batch, masked_tokens=tokens))
    out["loss"].backward()
    return out


REPORTS = ["A small nodule in the right anterior upper region. No cyst is seen.",
           "A large heterogeneous mass in the left posterior lower region.",
           "No focal lesion is identified. No pleural effusion."]


def test_a_frozen_minilm_gets_no_gradient_and_the_decoder_does():
    from vlp.models.towers.text import HFText, HFTextConfig

    try:
        tower = HFText(HFTextConfig(path="minilm", context_length=32, freeze=True), E)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    head = _head(vocab_size=30522, text_input="tower")
    _tower_step(tower, head, REPORTS)
    assert all(p.grad is None for p in tower.model.parameters())
    assert tower.proj.weight.grad is not None  # the frozen tower's projection still trains
    for name in ("text_proj.weight", "fusion.cross.in_proj_weight", "predict.weight", "mask_embedding"):
        grad = dict(head.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_a_trainable_text_tower_learns_from_the_masked_words():
    from vlp.models.towers.text import OpenClipText, OpenClipTextConfig

    torch.manual_seed(0)
    tower = OpenClipText(OpenClipTextConfig(context_length=32, width=16, heads=2, layers=1), E)
    head = _head(vocab_size=49408, text_input="tower")
    _tower_step(tower, head, REPORTS)
    grads = [p.grad for p in tower.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:3])
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_the_embeddings_input_runs_with_a_frozen_minilm_tokenizer_and_never_calls_the_tower():
    from vlp.models.towers.text import HFTokenizer, minilm_path

    try:
        tokenizer = HFTokenizer(minilm_path(), 32)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    head = _head(vocab_size=30522)
    batch = {"text": tokenizer(REPORTS), "key": ["a", "b", "c"]}
    out = head(_inputs(batch))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and head.token_embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- vlp train
@pytest.mark.slow
def test_vlp_train_of_ct_simcrop_resumes_bit_for_bit_and_feeds_segmentation(tmp_path):
    """configs/ct_simcrop.yaml shrunk (16^3 volumes, a 1-layer ViT, the real frozen MiniLM): 4
    steps through `vlp train` with the ct evaluator and the monai export; resumed from step 2 it
    ends with the same weights and both heads' mask steps; the export starts a segmentation run."""
    import yaml
    from conftest import rerun_from_checkpoint, run_vlp

    from vlp.data_pipelines.sources import build
    from vlp.models.towers.text import minilm_path
    from vlp.train import segment as seg
    from vlp.train.weights import consolidate

    try:
        minilm_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    data = tmp_path / "data"
    build("ct-lesions", data, train_size=16, test_size=4, size=16, spacing=8.0, seed=1, lesion_prob=0.9)
    tree = yaml.safe_load(open("configs/ct_simcrop.yaml"))
    tree.update(name="simcrop", output_dir=str(tmp_path / "runs"))
    tree["data"] = {"train": [{"urls": str(data / "ct-lesions-train-000000.tar")}], "workers": 0, "shuffle_buffer": 8,
                    "sentences": 4}
    tree["model"]["image"].update(roi=[16, 16, 16], hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
    tree["model"]["text"].update(context_length=64, cache_size=256)
    tree["model"]["embed_dim"] = 16
    tree["model"]["heads"]["masked_volume"].update(decoder_dim=8, decoder_heads=2)
    tree["model"]["heads"]["masked_report"].update(decoder_dim=8, decoder_heads=2)
    tree["train"].update(steps=4, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=2, keep_checkpoints=3)
    tree["evals"][0].update(data=str(data / "ct-lesions-test-000000.tar"), batch_size=2)
    config = tmp_path / "simcrop.yaml"
    config.write_text(yaml.safe_dump(tree))
    run_vlp("train", config)
    run = tmp_path / "runs" / "simcrop"
    results = json.loads((run / "results.json").read_text())
    assert "ct_mean_auroc" in results
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/masked_report" in line for line in logged)

    reference = consolidate(run / "checkpoints", "step_00000004")
    assert int(reference["objective.heads.masked_report.mask_step"]) == 4
    checkpoints = rerun_from_checkpoint(config, tmp_path / "runs", "simcrop", "step_00000004", "step_00000002")
    resumed = consolidate(checkpoints, "step_00000004")
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)

    segment_tree = {"name": "seg", "output_dir": str(tmp_path / "runs"),
                    "data": {"train": str(data / "ct-lesions-train-000000.tar"),
                             "test": str(data / "ct-lesions-test-000000.tar"), "train_size": 8},
                    "model": {"encoder": str(run / "export" / "monai"), "feature_size": 4},
                    "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1}}
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(segment_tree))
    out = seg.segment(seg.load_segment_config(tmp_path / "seg.yaml"))
    assert out["variant"] == "pretrained" and "dice_mean" in out


@pytest.mark.parametrize("text", ["hf_text", "open_clip_text"])
def test_text_input_tower_runs_the_masked_report_through_the_models_text_tower(text):
    """`text_input: tower` through VLPModel (ct_simcrop shrunk): the model runs the masked report
    through its own text tower once more; a frozen MiniLM gets no gradient (its projection does),
    a trainable open_clip text tower gets one in its transformer."""
    import yaml

    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load(open("configs/ct_simcrop.yaml"))
    tree["data"] = {"train": [{"urls": "x.tar"}], "sentences": 4}
    tree["evals"] = []
    tree["export"] = []
    tree["model"]["image"].update(roi=[16, 16, 16], hidden_size=16, mlp_dim=32, num_layers=1, num_heads=2)
    tree["model"]["embed_dim"] = 16
    tree["model"]["heads"]["masked_report"].update(text_input="tower")
    if text == "hf_text":
        from vlp.models.towers.text import minilm_path

        try:
            minilm_path()
        except FileNotFoundError as error:
            pytest.skip(str(error))
        tree["model"]["text"] = {"type": "hf_text", "path": "minilm", "context_length": 32, "freeze": True, "proj": "mlp"}
    else:
        tree["model"]["text"] = {"type": "open_clip_text", "context_length": 32, "width": 16, "heads": 2, "layers": 1}
        tree["model"]["heads"]["masked_report"]["vocab_size"] = 49408
    torch.manual_seed(0)
    model = VLPModel(load_config(tree=tree).model).train()
    tok = model.text.tokenizer()
    reports = ["A small nodule in the right anterior upper region. No cyst.", "No focal lesion is identified."]
    sentences = tok([s for r in reports for s in (r.split(". ") + [""] * 4)[:4]]).view(2, 4, -1)
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "text": tok(reports), "sentences": sentences,
             "sentence_mask": sentences[..., 1] != 0, "caption": reports, "key": ["a", "b"]}
    out = model(batch)
    assert torch.isfinite(out["logging"]["loss/masked_report"])
    out["loss"].backward()
    graded = {n for n, p in model.text.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if text == "hf_text":
        assert not any(n.startswith("model.") for n in graded) and any(n.startswith("proj") for n in graded)
    else:
        assert any("transformer" in n for n in graded), graded
