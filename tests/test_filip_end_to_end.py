"""A model whose first head is FILIP runs zero-shot, retrieval and grounding end to end.

FILIP scores pairs token against token, which zero-shot class embeddings (prompt averages) and
the retrieval evaluator's caption embeddings do not carry: the head keeps the base scoring
(global cosine) for those two, and grounds with its token similarity. The test checks that each
evaluator runs on a FILIP-first model, and that the zero-shot and retrieval numbers are those of
the global cosine the head declares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import DEMO_CONFIG

from vlp.data_pipelines.sources import build


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build("shapes", out, train_size=1, test_size=6, shard_size=10, image_size=64)
    return out


def _filip_first_model(tmp_path: Path, second_head: str | None = "clip"):
    from vlp.models.dual_encoder import VLPModel
    from vlp.train.config import load_config

    tree = yaml.safe_load(DEMO_CONFIG.read_text())
    tree["output_dir"] = str(tmp_path)
    tree["data"] = {"train": [{"urls": str(tmp_path / "unused.tar")}]}
    heads = {"filip": {"block_size": 2}}
    if second_head:
        heads[second_head] = {}
    tree["model"] = {
        "embed_dim": 16,
        "image": {"type": "open_clip_vit", "image_size": 64, "patch_size": 16, "width": 16, "layers": 1, "head_width": 8},
        "text": {"type": "open_clip_text", "context_length": 40, "width": 16, "heads": 2, "layers": 1},
        "heads": heads,
    }
    tree["evals"], tree["export"] = [], []
    torch.manual_seed(0)
    return VLPModel(load_config(tree=tree).model).eval()


@pytest.mark.slow  # three evaluators on a tiny model, ~50 s on 2 shared cores
@pytest.mark.parametrize("second_head", [None, "clip"])
def test_filip_first_model_runs_zeroshot_retrieval_and_grounding(tmp_path, digits_dir, shapes_dir, second_head):
    from vlp.train.evals import EVALUATORS, EvalContext
    from vlp.train.evals.common import scoring_head

    model = _filip_first_model(tmp_path, second_head)
    assert next(iter(model.objective.heads)) == "filip"
    assert type(scoring_head(model)).__name__ == "FilipHead"
    shapes_test = str(shapes_dir / "shapes-test-000000.tar")
    runs = {
        "zeroshot": {"data": str(digits_dir / "digits-test-000000.tar"), "batch_size": 64},
        "retrieval": {"data": shapes_test, "batch_size": 4, "chunk_size": 3},
        "grounding": {"data": shapes_test, "batch_size": 4, "method": "auto"},
    }
    for evaluator, options in runs.items():
        cls = EVALUATORS.get(evaluator)
        with torch.no_grad():
            results = cls(cls.config_class(type=evaluator, **options)).run(model, EvalContext())
        assert results and all(np.isfinite(float(v)) for v in results.values()), (evaluator, results)
        if evaluator == "zeroshot":
            assert results["zeroshot_samples"] == 359
        if evaluator == "grounding":
            assert 0.0 <= results["pointing_acc"] <= 1.0 and "retrieval_r1" in results


def test_filip_scores_zeroshot_by_global_cosine_and_grounds_by_tokens(tmp_path, shapes_dir):
    model = _filip_first_model(tmp_path, None)
    head = model.objective.heads.filip
    assert head.scores_embeddings and head.grounds and not head.scores_with_tokens
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)
    cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(head.pairwise_scores(image, text), cosine)
