"""monai: the MONAI ViT of a `monai_vit3d` tower (`monai.networks.nets.ViT` names, which are also
`UNETR(...).vit`'s) + `monai_vit_config.json`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlp.export.base import EXPORTERS, Exporter, ExportError, RunConfig, model_state, save_tensors, tower_class, write_json

WEIGHTS = "monai_vit.safetensors"
CONFIG_FILE = "monai_vit_config.json"
PREFIX = "image.vit."


class MonaiExporter(Exporter):
    example_image = {"type": "monai_vit3d", "roi": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 16,
                     "mlp_dim": 32, "num_layers": 1, "num_heads": 2, "spacing": None}

    def write(self, model: torch.nn.Module, config: RunConfig, out: Path) -> list[str]:
        """The MONAI ViT (`monai.networks.nets.ViT(..., classification=False)` names, the same as
        `UNETR(...).vit`'s) + the ViT's constructor arguments."""
        image = config.model.image
        if tower_class(image).trunk_format != "monai":
            raise ExportError(f"monai export needs a `monai_vit3d` image tower, the model has {image.type}")
        vit = {k[len(PREFIX):]: v for k, v in model_state(model).items() if k.startswith(PREFIX)}
        save_tensors(vit, out / WEIGHTS)
        vit_args = {
            "in_channels": 1, "img_size": list(image.roi), "patch_size": list(image.patch_size),
            "hidden_size": image.hidden_size, "mlp_dim": image.mlp_dim, "num_layers": image.num_layers,
            "num_heads": image.num_heads, "proj_type": "conv", "classification": False, "spatial_dims": 3,
            "qkv_bias": image.qkv_bias,
        }
        # UNETR builds ViT(patch_size=16, num_layers=12) itself: only then do these weights fit it.
        unetr_ok = tuple(image.patch_size) == (16, 16, 16) and image.num_layers == 12
        write_json(out / CONFIG_FILE, {
            "vit_args": vit_args,
            "unetr_compatible": unetr_ok,
            "unetr_args": {"in_channels": 1, "img_size": list(image.roi), "hidden_size": image.hidden_size,
                           "mlp_dim": image.mlp_dim, "num_heads": image.num_heads, "proj_type": "conv",
                           "qkv_bias": image.qkv_bias} if unetr_ok else None,
            "input": "volumes (B, 1, H, W, D), RAS axis order, intensities in [-1, 1] (hu_window "
                     f"{list(image.hu_window)}, spacing {list(image.spacing) if image.spacing else None})",
        })
        return [WEIGHTS, CONFIG_FILE]

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        """The ViT as MONAI itself loads it (`ViT(**vit_args).load_state_dict`), with our names."""
        from monai.networks.nets import ViT
        from safetensors.torch import load_file

        meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
        vit = ViT(**meta["vit_args"])
        vit.load_state_dict(load_file(str(Path(directory) / WEIGHTS)), strict=True)
        return {PREFIX + k: v for k, v in vit.state_dict().items()}


EXPORTERS.register("monai")(MonaiExporter())
