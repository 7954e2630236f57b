"""The shard sample every CT source (`ct`, `ct-rate`, `ct-lesions`) writes, and their shared helpers.

Every CT sample is written as
    {key}.npy   the volume: int16 HU, RAS-oriented (H, W, D) = (x, y, z), resampled at build
                time to the source's `spacing` (so shards stay small and loaders do no resampling;
                int16 is exact for integer HU and half the bytes of float32, where float16 would
                round HU above 2048 to even numbers);
    {key}.txt   the report;
    {key}.json  "sentences" (findings + impression), "labels" {name: 0/1}, "spacing", "affine"
                (voxel -> RAS mm), "shape", "axis_order", "hu" (whether a rescale slope/intercept
                was applied and why) and "intensity" (what the stored values are: HU, no window
                applied).
Which sentences state absence or normality is not stored: the `ct_align` head, which is the one
that needs it, flags the sentences the loader sends (`models/heads/ct_align.py`).
ct-lesions also writes {key}.mask.npy (int8 label map: voxel value i + 1 is lesion i) and the
lesion list in .json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ValidationError

from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.text import report_sentences
from vlp.data_pipelines.volume_io import Volume, volume_to_npy

AXIS_ORDER = "RAS (H, W, D) = (x: toward Right, y: toward Anterior, z: toward Superior)"
INTENSITY = {"stored": "int16 HU", "window_applied": False}


def parse_options(model: type[BaseModel], source: str, options: dict) -> BaseModel:
    try:
        return model(**options)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise DataError(f"{source}: option {where}: {first['msg']}") from None


def source_folder(source: str, arg: Optional[str], needs: str) -> Path:
    """The folder of `SOURCE:DIR`; DataError when it is not given (`needs` says what it should be)
    or is not a folder."""
    if not arg:
        raise DataError(f"source {source!r} needs {needs}")
    root = Path(arg)
    if not root.is_dir():
        raise DataError(f"{source}:{arg}: not a folder")
    return root


def ct_sample(key: str, volume: Volume, report: str, labels: dict[str, int], extra: dict | None = None) -> dict:
    """One shard sample from a volume already at its target spacing (see the module docstring)."""
    sentences = report_sentences(report)
    meta = {
        "sentences": sentences,
        "labels": {name: int(value) for name, value in labels.items()},
        "spacing": list(volume.spacing),
        "affine": np.asarray(volume.affine).round(6).tolist(),
        "shape": list(volume.array.shape),
        "axis_order": AXIS_ORDER,
        "hu": volume.hu.to_json(),
        "intensity": INTENSITY,
        "source": volume.source,
    }
    meta.update(extra or {})
    return {"__key__": key, "npy": volume_to_npy(volume.array), "txt": report, "json": meta}


def safe_key(name: str) -> str:
    key = name.replace(".nii.gz", "").replace(".nii", "").replace(".npy", "")
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key) or "volume"
