"""Raw sample -> training example -> batch: decode, preprocess, tokenize and collate.

Runs inside the DataLoader workers (`SamplePipeline` is picklable) and is shared by the train and
eval datasets. A sample that fails a check raises `BadSample` and is counted, not batched.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data._utils.collate import default_collate

from vlp.data_pipelines.bad_samples import BAD_REASONS, BadSample, format_reasons
from vlp.data_pipelines.decode import IMAGE_EXTENSIONS, PIL_MAX_IMAGE_PIXELS, decode_image, peek_image
from vlp.data_pipelines.gpu_decode import collate_planned, plan_jpeg
from vlp.data_pipelines.seeds import seeded, stable_seed
from vlp.data_pipelines.text import caption_sentences, sample_sub_captions


# A reinforced sample (`vlp shards reinforce`) carries a frozen model's embeddings of itself in
# these tar members; the batch holds them under these keys (the distill and compat heads read them).
TEACHER_IMAGE_MEMBER, TEACHER_TEXT_MEMBER, TEACHER_META_MEMBER = "teacher_image.npy", "teacher_text.npy", "teacher.json"
TEACHER_IMAGE, TEACHER_TEXT, TEACHER_SCALE = "teacher_image_embed", "teacher_text_embed", "teacher_logit_scale"


def read_teacher(sample: dict) -> Optional[tuple[np.ndarray, np.ndarray, float]]:
    """(image (E,), text (E,) float16 embeddings, logit scale) of a reinforced sample, None for a
    plain one; BadSample("missing_field") when its members are incomplete or unreadable."""
    present = [name in sample for name in (TEACHER_IMAGE_MEMBER, TEACHER_TEXT_MEMBER, TEACHER_META_MEMBER)]
    if not any(present):
        return None
    if not all(present):
        raise BadSample("missing_field")
    try:
        image = np.load(io.BytesIO(sample[TEACHER_IMAGE_MEMBER]), allow_pickle=False)
        text = np.load(io.BytesIO(sample[TEACHER_TEXT_MEMBER]), allow_pickle=False)
        scale = float(json.loads(sample[TEACHER_META_MEMBER])["logit_scale"])
    except (ValueError, KeyError, TypeError, OSError):
        raise BadSample("missing_field") from None
    if image.ndim != 1 or image.shape != text.shape:
        raise BadSample("missing_field")
    return image, text, scale


def error_marker(message: str) -> dict:
    """The stream item a worker yields when its stream cannot go on; the loader raises it as
    DataError(message) in the main process."""
    return {"__error__": message}


@dataclass
class SamplePipeline:
    """Decode + preprocess + tokenize + collate; picklable, shared by the train and eval loaders."""

    preprocess: Callable
    tokenizer: Callable[[list[str]], torch.Tensor]
    batch_size: int
    caption_key: str = "txt"
    parent_caption_key: Optional[str] = None
    max_image_pixels: int = PIL_MAX_IMAGE_PIXELS
    sub_captions: int = 0
    sub_caption_sentences: int = 3
    sentences: int = 0
    seed: int = 0
    max_bad_fraction: float = 1.0
    bad_window: int = 1000
    # The preprocess's `finish_batch` (uint8 -> normalised float) is left to the model: batches
    # carry the uint8 pixels, which the image tower normalises on the device (training loader).
    finish_on_device: bool = False
    # `data.decode: gpu`: JPEGs are not decoded here but planned (bytes + crop box drawn from the
    # sample's seed) for the device to decode (`data_pipelines.gpu_decode`).
    decode_on_device: bool = False

    @property
    def wants_sample(self) -> bool:
        return bool(getattr(self.preprocess, "wants_sample", False))

    def caption(self, sample: dict, key: Optional[str] = None) -> str:
        data = sample.get(key or self.caption_key)
        if data is None:
            raise BadSample("missing_field")
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("bad_caption") from None
        if not caption:
            raise BadSample("empty_caption")
        return caption

    def image_bytes(self, sample: dict) -> bytes:
        for ext in IMAGE_EXTENSIONS:
            if ext in sample:
                return sample[ext]
        raise BadSample("missing_field")

    def looks_good(self, sample: dict) -> bool:
        """The cheap checks used while skipping batches on resume (no image decode)."""
        try:
            self.caption(sample)
            if self.parent_caption_key:
                self.caption(sample, self.parent_caption_key)
            if not self.wants_sample:
                peek_image(self.image_bytes(sample), self.max_image_pixels)
        except BadSample:
            return False
        except Exception:  # noqa: BLE001 - PIL raises many types on a bad header
            return False
        return True

    def decode(self, sample: dict, rng_seed: int) -> dict:
        caption = self.caption(sample)
        parent = self.caption(sample, self.parent_caption_key) if self.parent_caption_key else None
        if getattr(self.preprocess, "wants_seed", False):
            # It draws its augmentation from the seed it is handed: no global RNG to reseed.
            image = self._image(sample, lambda image_or_sample: self.preprocess(image_or_sample, rng_seed), rng_seed)
        else:
            with seeded(rng_seed):
                image = self._image(sample, self.preprocess)
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode("utf-8").strip())
            except ValueError:
                raise BadSample("missing_field") from None
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = {}
        return {"image": image, "caption": caption, "label": label, "key": sample["__key__"], "meta": meta,
                "url": sample.get("__url__", ""), "parent": parent, "teacher": read_teacher(sample)}

    def _image(self, sample: dict, preprocess: Callable, seed: int = 0) -> Any:
        if self.wants_sample:
            try:
                return preprocess(sample)
            except Exception:  # noqa: BLE001 - any failure of a user preprocess is a bad sample
                raise BadSample("bad_image") from None
        data = self.image_bytes(sample)
        try:
            if self.decode_on_device:
                planned = plan_jpeg(sample, self.preprocess, seed, self.max_image_pixels)
                if planned is not None:
                    return planned
            pil = decode_image(data, self.max_image_pixels)
        except Image.DecompressionBombError:
            raise BadSample("image_too_large") from None
        except Exception:  # noqa: BLE001
            raise BadSample("bad_image") from None
        try:
            return preprocess(pil)
        except Exception:  # noqa: BLE001
            raise BadSample("bad_image") from None

    def finish_images(self, images: Any) -> Any:
        """The preprocess's batch step (e.g. normalising uint8 images in one op), if it has one
        and the model does not do it on the device (`finish_on_device`)."""
        finish = None if self.finish_on_device else getattr(self.preprocess, "finish_batch", None)
        return finish(images) if finish is not None else images

    def collate(self, items: list[dict], bad: Counter, bad_shards: set[str], epoch: int) -> dict:
        """Decoded items (`decode`'s dicts) -> one batch of B = len(items):
        {"image": (B, C, H, W) or (B, 1, H, W, D), "text": (B, L), "label": (B,) (-1: none),
        "key", "caption", "meta": B each, "bad": {reason: count skipped before it}, "bad_shards"},
        plus "parent_caption"/"parent_text" (B, 1, L), "sub_text" (B, K, L) and "sentences"
        (B, S, L) with "sentence_mask" (B, S) when configured. With `decode_on_device`, "image"
        holds only the worker-decoded samples, with "jpeg" and "crop" (`gpu_decode.collate_planned`).
        Reinforced samples add TEACHER_IMAGE / TEACHER_TEXT (B, E) float16 and TEACHER_SCALE (B,),
        row i sample i, when every sample of the batch carries them."""
        captions = [item["caption"] for item in items]
        images = [item["image"] for item in items]
        batch = {
            **(collate_planned(images) if self.decode_on_device else
               {"image": self.finish_images(default_collate(images))}),
            "text": self.tokenizer(captions),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "key": [item["key"] for item in items],
            "caption": captions,
            "meta": [item["meta"] for item in items],
            "bad": {reason: bad.get(reason, 0) for reason in BAD_REASONS},
            "bad_shards": sorted(bad_shards),
        }
        teachers = [item.get("teacher") for item in items]
        if teachers and all(teacher is not None for teacher in teachers):
            batch[TEACHER_IMAGE] = torch.from_numpy(np.stack([t[0] for t in teachers]).astype(np.float16))  # (B, E)
            batch[TEACHER_TEXT] = torch.from_numpy(np.stack([t[1] for t in teachers]).astype(np.float16))
            batch[TEACHER_SCALE] = torch.tensor([t[2] for t in teachers], dtype=torch.float32)  # (B,)
        if self.parent_caption_key:
            batch["parent_caption"] = [item["parent"] for item in items]
            batch["parent_text"] = self.tokenizer(batch["parent_caption"])[:, None]  # (B, 1, L)
        if self.sub_captions:
            draws = []
            for caption, key in zip(captions, batch["key"]):
                rng = random.Random(stable_seed("sub", self.seed, epoch, key))
                draws.append(sample_sub_captions(caption, self.sub_captions, rng, self.sub_caption_sentences))
            tokens = self.tokenizer([text for sample in draws for text in sample])  # (B*K, L)
            batch["sub_text"] = tokens.view(len(items), self.sub_captions, -1)  # (B, K, L)
        if self.sentences:
            flat, mask = [], []
            for caption in captions:
                sentences = (caption_sentences(caption) or [caption])[: self.sentences]
                mask.append([True] * len(sentences) + [False] * (self.sentences - len(sentences)))
                flat.extend(sentences + [""] * (self.sentences - len(sentences)))
            tokens = self.tokenizer(flat)  # (B*S, L)
            batch["sentences"] = tokens.view(len(items), self.sentences, -1)  # (B, S, L)
            batch["sentence_mask"] = torch.tensor(mask, dtype=torch.bool)
        return batch

    def batches(self, stream: Iterator[dict], count: Optional[int], epoch: int, seed_base: int,
                position: int = 0, snapshot: Optional[Callable[[int, int], Any]] = None) -> Iterator[dict]:
        """`count` batches (endless when None) from a raw sample stream.

        `position` is the index in the stream of its first sample (after a resume); each sample's
        augmentation seed is derived from its position. `snapshot(position, batches made)`, when
        given, is called after each batch is complete and its result put in batch["__position__"].
        """
        produced = 0
        while count is None or produced < count:
            items: list[dict] = []
            bad: Counter = Counter()
            bad_shards: set[str] = set()
            bad_run = 0  # consecutive bad samples: a stream that only yields bad ones never ends
            while len(items) < self.batch_size:
                sample = next(stream)
                if "__error__" in sample:  # the stream cannot go on: hand the message to the main process
                    yield sample
                    return
                if "__bad__" in sample:
                    bad[sample["__bad__"]] += 1
                    bad_shards.add(sample["__url__"])
                    continue
                position += 1
                try:
                    items.append(self.decode(sample, stable_seed(seed_base, position)))
                    bad_run = 0
                except BadSample as failure:
                    bad[failure.reason] += 1
                    bad_shards.add(sample.get("__url__", ""))
                    bad_run += 1
                    # Over the bad-fraction rule (or, with the rule off, 100 windows of nothing
                    # but bad samples): the trainer would never get a batch to judge, so stop here.
                    if bad_run >= self.bad_window * (1 if self.max_bad_fraction < 1 else 100):
                        yield error_marker(f"{bad_run} bad samples in a row ({format_reasons(bad)}) "
                                           f"in shards {', '.join(sorted(bad_shards))}")
                        return
            batch = self.collate(items, bad, bad_shards, epoch)
            produced += 1
            if snapshot is not None:
                batch["__position__"] = snapshot(position, produced)
            yield batch

