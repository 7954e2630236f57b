"""Hierarchy probe for a hyperbolic head: do generic captions sit closer to the origin than specific ones?

Entailment cones (Desai et al. 2023) make generic concepts ("a digit") embed near the hyperboloid's origin
and specific ones ("a handwritten digit 7") further out. This evaluator lifts two groups of
captions with the model's first head that declares `Head.hyperbolic` and reports each group's mean geodesic distance to the
origin, plus the fraction of (generic, specific) pairs that are in the right order. With an
`out_dir` it also writes a PNG: distance to the origin against the position along the first
principal direction of the tangent vectors, the two groups coloured (the paper's Fig. style).

Needs no data shards; `vlp eval hierarchy --checkpoint PATH` runs it on the defaults below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import Field, field_validator

from vlp.core.errors import ConfigError
from vlp.models import lorentz as L
from vlp.train.evals.base import EVALUATORS, EvalConfig, EvalContext, EvalExample, Evaluator
from vlp.train.evals.common import encode_texts

# Defaults for the digits demo: the generic captions are those the digits source mixes into
# training with caption_style=hierarchical; the specific ones name a digit.
DIGIT_GENERIC = ["a handwritten number", "a digit", "a number written by hand", "a handwritten digit", "a number"]
DIGIT_SPECIFIC = [f"a handwritten digit {n}" for n in range(10)] + [
    f"a photo of the number {w}" for w in ("zero", "three", "five", "seven", "nine")
]


class HierarchyEvalConfig(EvalConfig):
    type: Literal["hierarchy"] = "hierarchy"
    generic: list[str] = Field(default_factory=lambda: list(DIGIT_GENERIC))
    specific: list[str] = Field(default_factory=lambda: list(DIGIT_SPECIFIC))
    prefix: str = "hierarchy_"

    @field_validator("generic", "specific")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not text.strip() for text in value):
            raise ValueError("needs at least one caption and no empty ones")
        return value


def hyperbolic_head(model: Any) -> Any:
    """The model's first head (config order) with a hyperbolic geometry; a clear error when there is none."""
    heads = getattr(getattr(model, "objective", None), "heads", {})
    for head in heads.values():
        if head.hyperbolic:
            return head
    raise ConfigError(f"hierarchy: the model has no hyperbolic head (Head.hyperbolic; heads: {', '.join(heads) or 'none'})")


def evaluate_hierarchy(
    model: Any,
    generic: list[str],
    specific: list[str],
    out_png: Optional[str | Path] = None,
    device: Optional[torch.device] = None,
    prefix: str = "hierarchy_",
) -> dict[str, float]:
    """Mean distance to the origin of lifted generic and specific captions.

    Returns {"<prefix>generic_mean_dist", "<prefix>specific_mean_dist", "<prefix>order_accuracy"}:
    the last is the fraction of (generic, specific) pairs whose generic caption is closer to the
    origin (1.0: a perfect hierarchy, 0.5: none).
    """
    head = hyperbolic_head(model)
    device = device or next(model.parameters()).device
    with torch.no_grad():
        embeds = encode_texts(model, list(generic) + list(specific), device)  # (G + S, E)
        points = head.lift_text(embeds)  # (G + S, E)
        curv = head.curvature()
        radius = L.origin_dist(points, curv).cpu()  # (G + S,)
    generic_radius, specific_radius = radius[: len(generic)], radius[len(generic) :]
    closer = (generic_radius[:, None] < specific_radius[None, :]).double().mean()
    results = {
        f"{prefix}generic_mean_dist": float(generic_radius.mean()),
        f"{prefix}specific_mean_dist": float(specific_radius.mean()),
        f"{prefix}order_accuracy": float(closer),
    }
    if out_png is not None:
        tangent = L.log_map0(points, curv).cpu()  # (G + S, E)
        _plot(tangent, radius, len(generic), list(generic) + list(specific), Path(out_png), float(curv))
    return results


def _plot(tangent: torch.Tensor, radius: torch.Tensor, num_generic: int, captions: list[str], path: Path, curv: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # First principal direction of the uncentred tangent vectors, so the origin stays at 0.
    direction = torch.linalg.svd(tangent.double(), full_matrices=False).Vh[0]
    position = (tangent.double() @ direction).numpy()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    groups = (("generic", slice(0, num_generic), "tab:blue"), ("specific", slice(num_generic, None), "tab:orange"))
    for label, rows, colour in groups:
        ax.scatter(radius[rows].numpy(), position[rows], c=colour, label=label, s=22)
    for x, y, caption in zip(radius.numpy(), position, captions):
        ax.annotate(caption, (x, y), fontsize=5, alpha=0.7, xytext=(2, 2), textcoords="offset points")
    ax.scatter([0.0], [0.0], c="black", marker="x", label="origin")
    ax.set_xlabel("geodesic distance to the origin")
    ax.set_ylabel("first principal direction (tangent space)")
    ax.set_title(f"caption hierarchy (c = {curv:.3g})")
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


@EVALUATORS.register_by_type
class HierarchyEval(Evaluator):
    config_class = HierarchyEvalConfig
    example = EvalExample(split=None, heads=("meru",))

    def source(self) -> None:
        return None  # the captions are in the config

    def reduce(self, rows: dict, model: Any, context: EvalContext) -> dict[str, float]:
        # Tiny (a few dozen captions): every rank computes the same numbers, rank 0 draws.
        out_png = context.out_dir / f"hierarchy_step{context.step:06d}.png" if context.out_dir is not None else None
        return evaluate_hierarchy(
            model, self.config.generic, self.config.specific, out_png=out_png, device=context.device,
            prefix=self.config.prefix,
        )
