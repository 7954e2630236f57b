"""safetensors: the full model with our names (`model.safetensors`) + the run's `config.yaml`."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from vlp.export.base import EXPORTERS, Exporter, RunConfig, config_tree, model_state, save_tensors

SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"


class SafetensorsExporter(Exporter):
    def write(self, model: torch.nn.Module, config: RunConfig, out: Path) -> list[str]:
        save_tensors(model_state(model), out / SAFETENSORS_FILE, vlp="full")
        (out / CONFIG_FILE).write_text(yaml.safe_dump(config_tree(config), sort_keys=False))
        return [SAFETENSORS_FILE, CONFIG_FILE]

    def read(self, directory: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(Path(directory) / SAFETENSORS_FILE))

    def read_model(self, directory: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
        directory = Path(directory)
        if not ((directory / SAFETENSORS_FILE).is_file() and (directory / CONFIG_FILE).is_file()):
            return None
        return self.read(directory), yaml.safe_load((directory / CONFIG_FILE).read_text())


EXPORTERS.register("safetensors")(SafetensorsExporter())
