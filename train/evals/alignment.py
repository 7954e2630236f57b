"""Alignment and uniformity of the embedding (Wang & Isola 2020) on eval data, over steps.

On the L2-normalised image and caption embeddings of every eval sample (the hypersphere the
Euclidean heads score on): `alignment` (mean squared distance of image-caption pairs),
`uniformity_image` and `uniformity_text` (log of the mean Gaussian potential, t = 2, over the
distinct pairs of each modality), computed as `models/heads/align_uniform.py` defines them.
Lower is better for both. A model whose heads are all hyperbolic has no such sphere: refused.

Each run appends the step's values to `plots/alignment_uniformity.png` (alignment and both
uniformities against step; the earlier points of a resumed run come from `metrics.jsonl`).

Distributed: each rank embeds its share; the embeddings are all-gathered (uniformity needs every
pair) and every rank computes the same values. The pair sums run in (chunk x N) blocks, so memory
stays at chunk * N floats; uniformity uses at most `max_samples` embeddings (an evenly strided
subset of the key-sorted set) to bound the N^2 cost.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.core.errors import ConfigError, DataError
from vlp.models.heads.align_uniform import alignment, gaussian_potential_sum
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.harness import encode_texts_lockstep, gather_rows, zero3_partitioned

PLOT_NAME = "alignment_uniformity.png"


class AlignmentConfig(EvalConfig):
    type: Literal["alignment"] = "alignment"
    t: float = Field(2.0, gt=0)
    alpha: float = Field(2.0, gt=0)
    max_samples: int = Field(10_000, ge=2)
    chunk_size: int = Field(2048, ge=1)
    prefix: str = ""


def blockwise_uniformity(features: torch.Tensor, t: float, chunk: int) -> float:
    """`uniformity` of (N, E) features, summed over (chunk, N) blocks (no (N, N) at once)."""
    total = sum(float(gaussian_potential_sum(features[start : start + chunk], features, t, start))
                for start in range(0, len(features), chunk))
    return math.log(total / (len(features) * (len(features) - 1)))


def plot_history(history: dict[int, dict[str, float]], prefix: str, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(history)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(steps, [history[s][f"{prefix}alignment"] for s in steps], marker="o")
    left.set_title("alignment (lower: pairs closer)")
    for modality in ("image", "text"):
        right.plot(steps, [history[s][f"{prefix}uniformity_{modality}"] for s in steps], marker="o", label=modality)
    right.set_title("uniformity, t = 2 (lower: more uniform)")
    right.legend()
    for axis in (left, right):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


@EVALUATORS.register_by_type
class Alignment(Evaluator):
    config_class = AlignmentConfig
    config: AlignmentConfig
    example = EvalExample(source="digits", build=(("shard_size", 200),), options=(("batch_size", 64),))

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__(config)
        self.history: dict[int, dict[str, float]] = {}

    def prepare(self, model: Any, context: EvalContext) -> None:
        heads = model.objective.heads
        if all(head.hyperbolic for head in heads.values()):
            raise ConfigError(f"alignment: needs a Euclidean head (heads: {', '.join(heads)}: all hyperbolic)")

    def per_batch(self, model: Any, batch: dict) -> dict:
        return {"image": model.encode_image(batch["image"])["image_embed"].float(),
                "caption": batch["caption"], "key": batch["key"]}

    def reduce(self, rows: dict, model: Any, context: EvalContext) -> dict[str, float]:
        """Every eval sample's normalised (image, caption) embeddings, key-sorted -> the values."""
        device = context.device
        # Each rank's own captions, a count that may differ between ranks: in lockstep.
        text = encode_texts_lockstep(model, rows.get("caption", []), device, zero3_partitioned(model))
        rows = gather_rows({**rows, "text": F.normalize(text, dim=-1),
                            **({"image": F.normalize(rows["image"], dim=-1)} if "image" in rows else {})},
                           ("image", "text", "key"))
        keys = rows.get("key", [])
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if len(order) < 2:
            raise DataError(f"alignment: {self.config.data}: needs at least 2 samples, got {len(order)}")
        image, text = rows["image"][order], rows["text"][order]
        stride = max(1, math.ceil(len(image) / self.config.max_samples))
        prefix, t, chunk = self.config.prefix, self.config.t, self.config.chunk_size
        return {
            f"{prefix}alignment": float(alignment(image, text, self.config.alpha)),
            f"{prefix}uniformity_image": blockwise_uniformity(image[::stride], t, chunk),
            f"{prefix}uniformity_text": blockwise_uniformity(text[::stride], t, chunk),
        }

    def run(self, model: Any, context: EvalContext) -> dict[str, float]:
        results = super().run(model, context)
        prefix = self.config.prefix
        if context.out_dir is not None:
            if not self.history:
                self.history.update(self._logged(Path(context.out_dir).parent / "metrics.jsonl"))
            self.history[context.step] = results
            plot_history(self.history, prefix, Path(context.out_dir) / PLOT_NAME)
        return results

    def _logged(self, metrics_path: Path) -> dict[int, dict[str, float]]:
        """Earlier evaluations of this run (a resumed run) from its metrics.jsonl."""
        names = [f"{self.config.prefix}{n}" for n in ("alignment", "uniformity_image", "uniformity_text")]
        history = {}
        if metrics_path.is_file():
            for line in metrics_path.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if all(f"eval/{name}" in record for name in names):
                    history[int(record["step"])] = {name: record[f"eval/{name}"] for name in names}
        return history
