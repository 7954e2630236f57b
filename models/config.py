"""`model:` of an experiment config: the embedding width, one image and one text tower, the heads.

The tower and head fields are typed from the registries when the experiment config is built
(`vlp.train.config.experiment_class`); this class is what every registered config shares, for
type hints in `vlp.models` and for readers.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, field_serializer, model_validator

from vlp.core.config import Strict


class ModelConfig(Strict):
    """`model:`. The tower and head fields are typed from the registries in `experiment_class()`;
    here they are what every registered config shares, for type hints and readers."""

    embed_dim: int = Field(512, ge=1)
    image: Any  # one IMAGE_TOWERS config, tagged by `type`
    text: Any  # one TEXT_TOWERS config, tagged by `type`
    heads: Any  # one optional field per registered head

    # The order heads were written in: the first scoring head decides evaluation geometry.
    _head_order: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_head_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, dict) and isinstance(data.get("heads"), dict):
            model._head_order = [str(name) for name in data["heads"]]
        return model

    @field_serializer("heads")
    def _heads_in_order(self, heads: Any) -> dict[str, Any]:
        return {name: cfg.model_dump(mode="json") for name, cfg in self.heads_dict().items()}

    def heads_dict(self) -> dict[str, Any]:
        present = {name: cfg for name, cfg in self.heads if cfg is not None}
        order = [n for n in self._head_order if n in present] + [n for n in present if n not in self._head_order]
        return {name: present[name] for name in order}

    @model_validator(mode="after")
    def _consistent(self):
        from vlp.models.heads import HEADS

        if not self.heads_dict():
            raise ValueError(f"model.heads: name at least one head ({', '.join(HEADS.names())})")
        for tower in ("image", "text"):
            own = getattr(getattr(self, tower), "embed_dim", None)
            if own is not None and own != self.embed_dim:
                raise ValueError(
                    f"model.{tower}.embed_dim={own} contradicts model.embed_dim={self.embed_dim}"
                )
        return self
