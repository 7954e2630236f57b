"""timm: the trunk of a `timm` image tower (timm's own names, no classifier) + timm's `config.json`."""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.export.base import EXPORTERS, Exporter, ExportError, RunConfig, model_state, save_tensors, tower_class, write_json

WEIGHTS = "model.safetensors"
PREFIX = "image.trunk."


class TimmExporter(Exporter):
    example_image = {"type": "timm", "model_name": "test_vit", "image_size": 32}

    def write(self, model: torch.nn.Module, config: RunConfig, out: Path) -> list[str]:
        """The timm trunk (timm's own names, no classifier, no projection) + timm's `config.json`."""
        image = config.model.image
        if tower_class(image).trunk_format != "timm":
            raise ExportError(f"timm export needs a `timm` image tower, the model has {image.type}")
        trunk = {k[len(PREFIX):]: v for k, v in model_state(model).items() if k.startswith(PREFIX)}
        save_tensors(trunk, out / WEIGHTS)
        cfg = model.image.trunk.pretrained_cfg
        pretrained_cfg = {
            "architecture": image.model_name,
            "input_size": [3, image.image_size, image.image_size],
            "mean": list(image.mean), "std": list(image.std),
            "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "num_classes": 0, "first_conv": cfg.get("first_conv"), "classifier": cfg.get("classifier"),
        }
        write_json(out / "config.json", {
            "architecture": image.model_name,
            "num_classes": 0,
            "num_features": int(model.image.trunk.num_features),
            # What the tower passed to timm.create_model besides num_classes / drop_path_rate.
            "model_args": dict(model.image.timm_kwargs),
            "pretrained_cfg": pretrained_cfg,
        })
        return [WEIGHTS, "config.json"]

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The trunk as timm itself loads it (`create_model` + `load_checkpoint`), with our names."""
        import json

        import timm

        meta = json.loads((Path(directory) / "config.json").read_text())
        trunk = timm.create_model(meta["architecture"], pretrained=False, num_classes=0, **meta["model_args"])
        timm.models.load_checkpoint(trunk, str(Path(directory) / WEIGHTS), strict=True)
        return {PREFIX + k: v for k, v in trunk.state_dict().items()}


EXPORTERS.register("timm")(TimmExporter())
