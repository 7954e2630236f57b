"""Evaluation batches straight from an image-folder tree (one folder per class), no shards.

The torchvision `ImageFolder` layout: `ROOT/<class>/<image>`; classes are the folder names in
sorted order, labels their indices. With splits, `ROOT/train/<class>/...` and
`ROOT/test/<class>/...`. Batches are the eval loader's dicts ("image" (B, C, H, W), "label" (B,),
"key", "caption": the class name, "text" (B, L) its tokens), so the evaluators read either.

Ranks take disjoint shares (every world_size-th file in sorted order) that together cover every
image once; no shuffle, the last batch may be short.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import default_collate

from vlp.data_pipelines.decode import IMAGE_SUFFIXES, PIL_MAX_IMAGE_PIXELS, decode_image
from vlp.data_pipelines.errors import DataError


def _class_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def is_image_folder(path: str | Path) -> bool:
    """True when `path` is a folder of class folders holding images (and no shards of its own)."""
    root = Path(path)
    if not root.is_dir() or any(root.glob("*.tar")):
        return False
    return any(_images(folder) for folder in _class_folders(root))


def split_root(path: str | Path, split: Optional[str]) -> Optional[Path]:
    """The image-folder tree of `split` under `path` (`path/split` when that is one, else `path`
    itself), or None when neither is an image folder."""
    root = Path(path)
    if split and is_image_folder(root / split):
        return root / split
    return root if is_image_folder(root) else None


@dataclass
class ImageFolder:
    """One split of an image-folder tree: `classnames[label]` is the folder of `files[i]`."""

    root: Path
    classnames: list[str]
    files: list[Path]
    labels: list[int]

    @classmethod
    def read(cls, root: str | Path) -> "ImageFolder":
        root = Path(root)
        if not is_image_folder(root):
            raise DataError(f"{root}: not an image folder (ROOT/<class>/<image>, images {', '.join(IMAGE_SUFFIXES)})")
        classnames, files, labels = [], [], []
        for folder in _class_folders(root):
            images = _images(folder)
            if not images:
                continue  # an empty class folder is not a class (torchvision refuses it; we skip it)
            labels.extend([len(classnames)] * len(images))
            files.extend(images)
            classnames.append(folder.name)
        return cls(root=root, classnames=classnames, files=files, labels=labels)

    def batches(
        self, *, preprocess: Callable, tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        batch_size: int, rank: int = 0, world_size: int = 1, max_image_pixels: int = PIL_MAX_IMAGE_PIXELS,
    ) -> Iterator[dict]:
        """This rank's share as eval-loader batches (see the module docstring)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        share = list(range(rank, len(self.files), world_size))
        finish = getattr(preprocess, "finish_batch", None)
        for start in range(0, len(share), batch_size):
            indices = share[start : start + batch_size]
            images = []
            for index in indices:
                try:
                    images.append(preprocess(decode_image(self.files[index].read_bytes(), max_image_pixels)))
                except Exception as error:  # noqa: BLE001 - PIL raises many types on a bad file
                    raise DataError(f"{self.files[index]}: not a readable image ({error})") from None
            image = default_collate(images)
            captions = [self.classnames[self.labels[index]] for index in indices]
            batch = {
                "image": finish(image) if finish is not None else image,
                "label": torch.tensor([self.labels[index] for index in indices], dtype=torch.long),
                "key": [str(self.files[index].relative_to(self.root).with_suffix("")) for index in indices],
                "caption": captions,
            }
            if tokenizer is not None:
                batch["text"] = tokenizer(captions)
            yield batch
