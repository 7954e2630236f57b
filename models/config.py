"""`model:` of an experiment config: the embedding width, one image and one text tower, the heads.

The tower and head fields are typed from the registries when this module is imported:
`image` / `text` a union of the registered tower configs tagged by `type` (`ImageTowerConfig`,
`TextTowerConfig`), `heads` one optional field per registered head (`HeadsConfig`).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import Field, PrivateAttr, create_model, field_serializer, model_validator

from vlp.core.config import Strict, validate
from vlp.models.heads import HEADS
from vlp.models.towers import IMAGE_TOWERS, TEXT_TOWERS


class OpenClipModelConfig(Strict):
    """`model.open_clip`: both towers and the logit scale (and bias) of one open_clip model.

    `name`: any model config open_clip ships (`ViT-B-32`, `convnext_base_w`, `ViT-B-16-SigLIP`),
    `hf-hub:ORG/REPO` (from the local Hugging Face cache) or `local-dir:DIR` (e.g. a `vlp export
    --format open_clip` folder). `pretrained`: a tag resolved through the local cache, or a
    checkpoint file (.bin / .pt / .safetensors, open_clip's layouts); absent: random weights, or
    for `hf-hub:` / `local-dir:` the folder's own."""

    name: str
    pretrained: Optional[str] = None
    strict: bool = True


def open_clip_defaults(data: dict) -> dict:
    """Fill `model.image` / `model.text` (type open_clip), `model.embed_dim` and, when no head is
    named, `model.heads` (siglip for a model with a logit bias, else clip) from `model.open_clip`."""
    import open_clip

    from vlp.models.pretrained import resolve_model_name

    section = data["open_clip"]
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        return data  # the field's own validation reports it
    data = dict(data)
    shared = {key: section[key] for key in ("name", "pretrained", "strict") if key in section}
    for tower in ("image", "text"):
        given = data.get(tower)
        if given is None:
            data[tower] = {"type": "open_clip", **shared}
        elif isinstance(given, dict) and given.get("type") == "open_clip":
            data[tower] = {**shared, **given}
    try:
        model_cfg = open_clip.get_model_config(resolve_model_name(section["name"]))
    except ValueError as error:  # PretrainedError: one line naming the key
        raise ValueError(str(error)) from None
    if "embed_dim" not in data:
        data["embed_dim"] = model_cfg["embed_dim"]
    elif data["embed_dim"] != model_cfg["embed_dim"]:
        raise ValueError(f"model.embed_dim={data['embed_dim']} contradicts {section['name']}'s embed_dim "
                         f"{model_cfg['embed_dim']} (leave it out with model.open_clip)")
    if not data.get("heads"):
        data["heads"] = {"siglip" if "init_logit_bias" in model_cfg else "clip": {}}
    return data


def tagged_union(registry: Any, attr: str = "config_class") -> Any:
    """A discriminated union (on `type`) of every registered component's config."""
    classes = tuple(getattr(cls, attr) for _, cls in registry.items())
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[classes], Field(discriminator="type")]


# Built once, when vlp.models is imported: the registries discover their components at import, so
# every registered tower and head is a valid config key from the first config read.
ImageTowerConfig = tagged_union(IMAGE_TOWERS)
TextTowerConfig = tagged_union(TEXT_TOWERS)
HeadsConfig = create_model(
    "HeadsConfig", __base__=Strict, **{name: (Optional[cls.config_class], None) for name, cls in HEADS.items()}
)


class ModelConfig(Strict):
    """`model:`: the embedding width, one image tower, one text tower, the heads (in the
    order written), each typed from its registry."""

    embed_dim: int = Field(512, ge=1)
    image: ImageTowerConfig  # one IMAGE_TOWERS config, tagged by `type`
    text: TextTowerConfig  # one TEXT_TOWERS config, tagged by `type`
    heads: HeadsConfig  # one optional field per registered head
    open_clip: Optional[OpenClipModelConfig] = None

    @model_validator(mode="before")
    @classmethod
    def _from_open_clip(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("open_clip") is not None:
            return open_clip_defaults(data)
        return data

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
    def _heads_in_order(self, heads: HeadsConfig) -> dict[str, Any]:
        return {name: cfg.model_dump(mode="json") for name, cfg in self.heads_dict().items()}

    def heads_dict(self) -> dict[str, Any]:
        present = {name: cfg for name, cfg in self.heads if cfg is not None}
        order = [n for n in self._head_order if n in present] + [n for n in present if n not in self._head_order]
        return {name: present[name] for name in order}

    @model_validator(mode="after")
    def _consistent(self):
        if not self.heads_dict():
            raise ValueError(f"model.heads: name at least one head ({', '.join(HEADS.names())})")
        for tower in ("image", "text"):
            own = getattr(getattr(self, tower), "embed_dim", None)
            if own is not None and own != self.embed_dim:
                raise ValueError(
                    f"model.{tower}.embed_dim={own} contradicts model.embed_dim={self.embed_dim}"
                )
        return self


RegisteredModelConfig = ModelConfig  # the name older callers import


def registered_model_config() -> type[ModelConfig]:
    """`ModelConfig`, typed from the registries (kept for callers of the earlier, lazily built class)."""
    return ModelConfig


def validate_model_config(tree: dict, source: str = "model card") -> ModelConfig:
    """A `model:` tree (as an experiment config or a model card holds it) -> its typed config;
    `ConfigError` naming `source` and the key path when it does not fit."""
    return validate(ModelConfig, tree, source)
