"""Global volume-report contrast (CT-CLIP): CLIP's symmetric InfoNCE on (volume, report) pairs.

The same loss, temperature and gathering as the `clip` head (`models/heads/clip.py`); a head of
its own so that a CT experiment names what it trains (`ct_contrastive` + `ct_align` +
`masked_volume`) and so evaluators pick it as the scoring geometry (plain cosine).
"""

from __future__ import annotations

from vlp.models.heads.base import HEADS
from vlp.models.heads.clip import ClipConfig, ClipHead


class CtContrastiveConfig(ClipConfig):
    """`clip`'s options: init_temperature, max_logit_scale, learn_temperature, tile_size."""


@HEADS.register("ct_contrastive")
class CtContrastiveHead(ClipHead):
    """`image_normed` (the pooled volume) against `text_normed` (the whole report)."""

    config_class = CtContrastiveConfig
