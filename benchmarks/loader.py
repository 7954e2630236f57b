"""Training-loader throughput: vlp's `build_train_loader` against open_clip's webdataset pipeline.

Per image size (JPEG shards of 256 and 512 px written by this script, img2dataset's layout:
{key}.jpg / .txt / .json per sample, quality 95, sizes.json beside the tars; crops of
scikit-learn's sample photos blended with smooth random textures, unique captions), in one run
and on the same shards:

  * vlp: `build_train_loader` as `vlp train` builds it (default `data.*` but the workers; the
    `open_clip_vit` tower's training transform, ViT-B/16's 224 px; the `open_clip_text` tower's
    tokenizer; uint8 images out, normalised later on the device);
  * open_clip: `open_clip_train.data.get_wds_dataset` with the args fields
    `open_clip_train.main` would pass, ViT-B-16's training transform (`image_transform_v2` of the
    model's preprocess config, default augmentation) and tokenizer (see `match_webdataset` for
    the one adaptation to the installed webdataset);
  * the same batch size and workers; each side warms up (worker start, shuffle buffers), then a
    fixed number of batches is timed. The sides run one after the other (never sharing the
    cores), interleaved over `--repeats` rounds, the best round kept.

JSON, per size: `vlp` / `open_clip`: samples_per_s, per_worker_samples_per_s (= / workers),
startup_s (to the first batch), worker and main-process CPU ms per sample over the timed
batches; `ratio` = vlp per worker / open_clip per worker (the CPU target: >= 1 at 256 px);
`cpu_ratio` = open_clip's worker CPU per sample / vlp's (a shared machine distorts CPU time far
less than wall time); `plain`: each side's per-sample work (decode, transform, tokenize,
collate) in a loop over samples held in memory, one thread, the ceiling of one worker;
`vlp_loader_vs_plain` (wall, per worker) and `vlp_loader_cpu_vs_plain` (CPU): what vlp's loader
machinery (tar reading, shuffle, IPC) keeps of it (the old script's target: >= 0.9).

With `--device cuda` (and CUDA present), also the rate into device memory: `vlp_device`, through
the trainer's `DeviceStream` (pinned, side-stream copy one batch ahead); `open_clip_device`,
through its train loop's `.to(device, non_blocking=True)`; `vlp_gpu_decode`, `data.decode: gpu`
(the workers send JPEG bytes and crop boxes, `GpuJpegDecode` decodes the batch on the device).
Elsewhere those fields say "skipped: ...". A side that fails prints its traceback to stderr and
its field is {"error": "..."}; the other sides still run. Prints ONE JSON line on stdout.

    python benchmarks/loader.py --quick                  # smoke test, < 1 minute on 2 cores
    python benchmarks/loader.py --workers 2 --repeats 2  # the CPU measurement
    python benchmarks/loader.py --workers 16 --device cuda --data /tmp/loader-shards
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.data_pipelines.collate import SamplePipeline  # noqa: E402
from vlp.data_pipelines.config import DataConfig  # noqa: E402
from vlp.data_pipelines.loader import build_train_loader  # noqa: E402
from vlp.data_pipelines.shards import write_shards  # noqa: E402
from vlp.models.towers.image import OpenClipVit, OpenClipVitConfig  # noqa: E402
from vlp.models.towers.text import OpenClipTextConfig, OpenClipTokenizer  # noqa: E402

MODEL = "ViT-B-16"  # open_clip's name; vlp's `open_clip_vit` tower defaults are its vision tower
JPEG_QUALITY = 95  # img2dataset's default encode_quality
GRAIN_SIGMA = 2.0  # uint8 levels of film grain
SHARD_FORMAT = 1  # bump when the generated samples change, so a reused --data folder is rebuilt
WORDS = ("a", "photo", "of", "the", "red", "blue", "green", "old", "small", "large", "wooden", "stone",
         "house", "garden", "flower", "temple", "roof", "tree", "river", "mountain", "city", "street",
         "near", "with", "and", "in", "on", "at", "sunset", "morning", "close-up", "view", "detail",
         "painting", "vintage", "modern", "bright", "dark", "summer", "winter", "traditional", "chinese",
         "yellow", "petals", "leaves", "sky", "clouds", "wall", "window", "door", "colourful", "pattern",
         "texture", "landscape", "portrait", "macro", "travel", "beautiful", "stock", "image", "for", "sale",
         "2019", "hd", "wallpaper", "background", "free", "design", "art", "print", "poster")


# ---------------------------------------------------------------------------------------------
# Shards: natural-ish JPEGs (crops of scikit-learn's sample photos, blended with smooth random
# textures and film grain) + unique captions, in img2dataset's layout.


def source_photos() -> list[np.ndarray]:
    """uint8 (H, W, 3) photos to crop from: scikit-learn's bundled samples (China, a flower,
    427 x 640), or smooth random textures where scikit-learn is absent."""
    try:
        from sklearn.datasets import load_sample_images

        return [np.asarray(image, dtype=np.uint8) for image in load_sample_images().images]
    except Exception:  # noqa: BLE001 - any failure: fall back to textures, said on stderr
        print("[loader] scikit-learn sample images unavailable; using random textures only", file=sys.stderr)
        rng = np.random.default_rng(1234)
        return [np.asarray(smooth_texture(rng, 640)) for _ in range(2)]


def smooth_texture(rng: np.random.Generator, size: int) -> Image.Image:
    """Random noise at 1/8 to 1/32 of `size`, upsampled: smooth blobs, compresses like a photo."""
    cells = max(2, size // int(rng.choice([8, 16, 32])))
    noise = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((size, size), Image.BILINEAR)


def make_image(rng: np.random.Generator, photos: list[np.ndarray], grain: np.ndarray, size: int) -> bytes:
    """JPEG bytes of one size x size image (img2dataset `resize_mode=center_crop`-like square)."""
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    image = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    texture = smooth_texture(rng, size)
    alpha = np.float32(rng.uniform(0.0, 0.35))  # texture weight
    cast = rng.uniform(0.75, 1.2, size=3).astype(np.float32) * (1 - alpha)  # colour cast, per channel
    pixels = np.asarray(image, dtype=np.float32) * cast + np.asarray(texture, dtype=np.float32) * alpha
    # Film grain: an upsampled crop is smoother than a downsampled photo; grain restores detail.
    y, x = int(rng.integers(0, grain.shape[0] - size + 1)), int(rng.integers(0, grain.shape[1] - size + 1))
    pixels += grain[y:y + size, x:x + size]
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def make_caption(rng: np.random.Generator) -> str:
    words = rng.choice(len(WORDS), size=int(rng.integers(8, 21)))
    return " ".join(WORDS[index] for index in words).capitalize()


_PHOTOS: list[np.ndarray] = []  # per generator process (`_init_generator`)


def _init_generator() -> None:
    global _PHOTOS
    _PHOTOS = source_photos()


@functools.lru_cache(maxsize=2)
def grain_tile(size: int) -> np.ndarray:
    """float32 (T, T, 3) Gaussian grain, T = max(1024, size); each image takes a random window."""
    tile = max(1024, size)
    return np.random.default_rng(99).normal(0.0, GRAIN_SIGMA, size=(tile, tile, 3)).astype(np.float32)


def shard_samples(job: tuple[int, int, int, int]) -> list[dict]:
    """The samples of shard `shard` (img2dataset keys: shard id then index in shard)."""
    shard, count, size, seed = job
    rng = np.random.default_rng([seed, size, shard])
    samples = []
    for index in range(count):
        key = f"{shard:05d}{index:04d}"
        jpeg = make_image(rng, _PHOTOS, grain_tile(size), size)
        samples.append({"__key__": key, "jpg": jpeg, "txt": make_caption(rng), "json": {
            "url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "error_message": None,
            "width": size, "height": size, "original_width": size, "original_height": size, "exif": "{}",
            "sha256": None}})
    return samples


def build_shards(folder: Path, size: int, shards: int, per_shard: int, seed: int) -> str:
    """Shards of `size` px in `folder` (reused when its manifest matches); returns the brace URL spec."""
    manifest = {"format": SHARD_FORMAT, "size": size, "shards": shards, "per_shard": per_shard, "seed": seed,
                "quality": JPEG_QUALITY}
    manifest_path = folder / "loader-bench.json"
    urls = f"{folder}/{{00000..{shards - 1:05d}}}.tar"
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest:
        return urls
    if folder.exists() and any(folder.iterdir()):
        if not manifest_path.exists():
            print(f"[loader] --data: {folder} holds files this benchmark did not write; give another folder",
                  file=sys.stderr)
            raise SystemExit(2)
        shutil.rmtree(folder)  # ours, with other settings
    folder.mkdir(parents=True)
    start = time.perf_counter()
    processes = max(1, min(os.cpu_count() or 1, shards))
    jobs = [(shard, per_shard, size, seed) for shard in range(shards)]
    # fork: the children only run numpy and PIL (no torch threads), and inherit nothing they lock.
    with multiprocessing.get_context("fork").Pool(processes, initializer=_init_generator) as pool:
        samples = itertools.chain.from_iterable(pool.imap(shard_samples, jobs))
        paths = write_shards(samples, folder, "bench", max_count=per_shard)
    # img2dataset names its shards 00000.tar ...; write_shards uses a prefix.
    sizes = {}
    for index, path in enumerate(paths):
        name = f"{index:05d}.tar"
        path.rename(folder / name)
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1, sort_keys=True))
    manifest_path.write_text(json.dumps(manifest))
    print(f"[loader] wrote {shards} x {per_shard} samples of {size} px to {folder} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return urls


def read_raw(folder: Path, count: int) -> list[dict]:
    """The first `count` samples of the shards as raw dicts (ext -> bytes), as a worker reads them."""
    samples: list[dict] = []
    for path in sorted(folder.glob("*.tar")):
        current: dict = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if current.get("__key__") != key:
                    if current:
                        samples.append(current)
                    current = {"__key__": key, "__url__": str(path)}
                current[ext] = tar.extractfile(member).read()
        samples.append(current)
        if len(samples) >= count:
            break
    return samples[:count]


# ---------------------------------------------------------------------------------------------
# The two pipelines, as their trainers build and consume them.


def vlp_transform():
    """The `open_clip_vit` tower's training transform (ViT-B/16 defaults: 224 px, OpenAI mean / std)."""
    tower = SimpleNamespace(config=OpenClipVitConfig())  # the transform needs only the config
    return OpenClipVit.preprocess(tower, train=True)


def vlp_tokenizer() -> OpenClipTokenizer:
    return OpenClipTokenizer(OpenClipTextConfig().context_length)  # what `open_clip_text` hands the loader


def open_clip_preprocess():
    """ViT-B-16's training transform as `create_model_and_transforms` builds it (size from the model
    config, default preprocess config and augmentation) and its tokenizer."""
    import open_clip
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

    size = open_clip.get_model_config(MODEL)["vision_cfg"]["image_size"]
    transform = image_transform_v2(PreprocessCfg(size=size), is_train=True, aug_cfg=AugmentationCfg())
    return transform, open_clip.get_tokenizer(MODEL)


def vlp_batches(urls: str, workers: int, batch_size: int, device: Optional[torch.device], decode: str) -> Iterator[int]:
    """Batch sizes of vlp's training stream, endless over epochs. With `device`: through the
    trainer's DeviceStream (and `GpuJpegDecode` as its device stage for `decode == "gpu"`)."""
    cfg = DataConfig(train=[{"urls": urls}], workers=workers, decode=decode)
    loader = build_train_loader(cfg, preprocess=vlp_transform(), tokenizer=vlp_tokenizer(), batch_size=batch_size,
                                rank=0, world_size=1, seed=0)
    if device is None:
        for epoch in itertools.count():
            for batch in loader.iterate(epoch):
                yield len(batch["key"])
        return
    from vlp.data_pipelines.device_stream import DeviceStream
    from vlp.data_pipelines.gpu_decode import GpuJpegDecode
    from vlp.train.checkpoint import TrainState

    stage = GpuJpegDecode(vlp_transform().size, device) if decode == "gpu" else None
    stream = DeviceStream(loader, TrainState(), device, torch.bfloat16, device_stage=stage)
    for batch in stream:
        assert batch["image"].device.type == device.type and batch["image"].dtype == torch.uint8
        yield batch["image"].shape[0]


def open_clip_batches(urls: str, workers: int, batch_size: int, device: Optional[torch.device]) -> Iterator[int]:
    """Batch sizes of open_clip's webdataset training stream, endless over epochs, consumed as
    `open_clip_train.train.train_one_epoch` does (set_epoch, then `.to(device, non_blocking=True)`)."""
    from open_clip_train import data as open_clip_data

    match_webdataset(open_clip_data)
    transform, tokenizer = open_clip_preprocess()
    # The fields get_wds_dataset reads, as open_clip_train.params parses them (defaults but these).
    args = argparse.Namespace(train_data=urls, val_data=None, dataset_resampled=False, train_num_samples=None,
                              train_data_upsampling_factors=None, val_num_samples=None, seed=0,
                              batch_size=batch_size, workers=workers, world_size=1)
    data = open_clip_data.get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    for epoch in itertools.count():
        data.set_epoch(epoch)
        for images, texts in data.dataloader:
            if device is not None:
                images = images.to(device=device, non_blocking=True)  # input_dtype None under amp
                texts = texts.to(device=device, non_blocking=True)
            yield images.shape[0]


def match_webdataset(open_clip_data: Any) -> None:
    """open_clip_train 3.3 asks for webdataset <= 0.2.86. Later webdataset versions end each shard's
    member stream with an empty dict (`tar_file_expander(eof_value={})`), which open_clip's
    `group_by_keys_nothrow` reads as a file and fails on (KeyError: 'fname'). Its tar stage is
    rebuilt here with `eof_value=None`: the stream webdataset 0.2.86 gave, through open_clip's own
    functions, at the same cost. `get_wds_dataset` looks the stage up by name when it is called."""
    import inspect

    from webdataset.tariterators import tar_file_expander, url_opener

    if "eof_value" not in inspect.signature(tar_file_expander).parameters:
        return  # a webdataset open_clip supports as it is

    def tarfile_to_samples_nothrow(src, handler=open_clip_data.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return open_clip_data.group_by_keys_nothrow(files, handler=handler)

    open_clip_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def vlp_plain(samples: list[dict], batch_size: int) -> Iterator[int]:
    """vlp's per-sample work (SamplePipeline: decode, transform, tokenize, collate) in this process."""
    pipeline = SamplePipeline(preprocess=vlp_transform(), tokenizer=vlp_tokenizer(), batch_size=batch_size,
                              finish_on_device=True)
    pipeline.tokenizer(["warm-up: builds the BPE tables, as a worker's first batch does"])
    yield 0  # set up: the timing starts here
    for batch in pipeline.batches(iter(samples), len(samples) // batch_size, epoch=0, seed_base=0):
        yield len(batch["key"])


def open_clip_plain(samples: list[dict], batch_size: int) -> Iterator[int]:
    """open_clip's per-sample work (wds "pilrgb" decode, transform, per-sample tokenize, stacking)."""
    transform, tokenizer = open_clip_preprocess()
    tokenizer("warm-up: builds the BPE tables, as a worker's first batch does")
    yield 0  # set up: the timing starts here
    for begin in range(0, len(samples) - batch_size + 1, batch_size):
        images, texts = [], []
        for sample in samples[begin:begin + batch_size]:
            with Image.open(io.BytesIO(sample["jpg"])) as image:
                image.load()
                images.append(transform(image.convert("RGB")))
            texts.append(tokenizer(sample["txt"].decode("utf-8"))[0])
        images, texts = torch.stack(images), torch.stack(texts)  # what wds.batched collates
        yield images.shape[0]


# ---------------------------------------------------------------------------------------------
# Timing.


def child_cpu_seconds() -> Optional[dict[int, float]]:
    """CPU seconds (user + system) of each live child process (the DataLoader workers); None
    without psutil (a bare GPU machine may lack it: the CPU fields then read null)."""
    try:
        import psutil
    except ImportError:
        return None
    times = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cpu = child.cpu_times()
            times[child.pid] = cpu.user + cpu.system
        except psutil.Error:  # exited meanwhile
            pass
    return times


def wait_for_workers_to_exit(timeout: float = 20.0) -> None:
    """A side's workers are gone before the next side starts, so they never share the cores."""
    gc.collect()
    try:
        import psutil
    except ImportError:
        time.sleep(1.0)  # DataLoader shutdown joins its workers; this covers the stragglers
        return
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    if alive:
        print(f"[loader] {len(alive)} worker processes still running after {timeout:.0f} s", file=sys.stderr)


def measure(make_batches: Callable[[], Iterator[int]], warmup: int, timed: int, workers: int,
            device: Optional[torch.device]) -> dict:
    """Time `timed` batches after `warmup` (worker start, shuffle-buffer fill, first batches)."""
    start = time.perf_counter()
    batches = make_batches()
    try:
        next(batches)
        startup = time.perf_counter() - start
        for _ in range(warmup - 1):
            next(batches)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        workers_before, main_before = child_cpu_seconds(), time.process_time()
        begin = time.perf_counter()
        samples = sum(next(batches) for _ in range(timed))
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - begin
        workers_after, main_after = child_cpu_seconds(), time.process_time()
    finally:
        batches.close()  # ends the generator: its loader and workers are released (attempt waits for them)
    worker_cpu = None
    if workers and workers_before is not None and workers_after is not None:
        worker_cpu = sum(cpu - workers_before.get(pid, 0.0) for pid, cpu in workers_after.items())
    rate = samples / wall
    return {"samples_per_s": round(rate, 1), "per_worker_samples_per_s": round(rate / max(workers, 1), 1),
            "startup_s": round(startup, 2), "timed_s": round(wall, 2), "timed_batches": timed,
            "worker_cpu_ms_per_sample": round(worker_cpu / samples * 1e3, 3) if worker_cpu is not None else None,
            "main_cpu_ms_per_sample": round((main_after - main_before) / samples * 1e3, 3)}


def measure_plain(make_batches: Callable[[], Iterator[int]]) -> dict:
    batches = make_batches()
    next(batches)  # the set-up (tokenizer tables, transform) is not timed,
    next(batches)  # nor the first batch (first-touch costs), as the loaders' warm-up is not
    start_cpu, start = time.process_time(), time.perf_counter()
    samples = sum(batches)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"samples_per_s": round(samples / wall, 1), "cpu_ms_per_sample": round(cpu / samples * 1e3, 3)}


def attempt(name: str, run: Callable[[], dict]) -> dict:
    """`run()`, or {"error": ...} with the traceback on stderr: one failing side never hides the others."""
    start = time.perf_counter()
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 - reported, and the benchmark goes on
        print(f"[loader] {name} failed:", file=sys.stderr)
        traceback.print_exc()
        # A DataLoader worker's error carries the worker's traceback: keep its first and last lines.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        result = {"error": f"{type(error).__name__}: {summary}"}
        del error  # its traceback holds the loader's frames, and so its workers
    # Outside the except block: the traceback is gone, so the workers can shut down.
    wait_for_workers_to_exit()
    print(f"[loader] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return result


def better(old: Optional[dict], new: dict) -> dict:
    """Best of the repeats by wall-clock rate (a shared machine only ever slows a run down); the
    CPU per sample and the start-up are the lowest seen. An error is kept only when no repeat
    succeeded."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    best = dict(max(old, new, key=lambda result: result["samples_per_s"]))
    for key in ("worker_cpu_ms_per_sample", "main_cpu_ms_per_sample", "startup_s"):
        values = [result[key] for result in (old, new) if result.get(key) is not None]
        best[key] = min(values) if values else None
    return best


def field(result: Any, key: str) -> Optional[float]:
    """`result[key]`, or None for a side that failed or was skipped."""
    return result.get(key) if isinstance(result, dict) else None


def ratio(top: Optional[float], bottom: Optional[float]) -> Optional[float]:
    return round(top / bottom, 3) if top and bottom else None


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, the same on both sides")
    parser.add_argument("--sizes", default="256,512", help="JPEG sizes in px, comma-separated")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (--quick: 32)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per side and size (default 10 per worker; --quick: 3 per worker)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="batches before timing (default 2 per worker + 1; --quick: 1 per worker + 1)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per size (default: one epoch holds the warm-up and timed batches)")
    parser.add_argument("--shards", type=int, default=None, help="shards per size (default max(4, 2 x workers))")
    parser.add_argument("--plain-batches", type=int, default=None,
                        help="batches of the in-process reference loops, the first one untimed "
                             "(default 5; --quick: 3; 0: skip them)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds, the best kept (default 2; --quick: 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: also time the copy into device memory and data.decode: gpu")
    parser.add_argument("--decode", default="cpu,gpu",
                        help="vlp decode variants on the device (gpu needs --device cuda; cpu,gpu or cpu)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the shards, reused across runs (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 1 minute on 2 cores)")
    args = parser.parse_args()
    try:
        args.sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--sizes: expected comma-separated integers, got {args.sizes!r}")
    args.decode = [mode.strip() for mode in args.decode.split(",") if mode.strip()]
    if not args.sizes or any(size < 32 for size in args.sizes):
        parser.error("--sizes: every size must be >= 32 px")
    if set(args.decode) - {"cpu", "gpu"}:
        parser.error(f"--decode: expected cpu and/or gpu, got {','.join(args.decode)}")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be >= 1")
    per_worker = max(args.workers, 1)
    args.batch_size = args.batch_size or (32 if args.quick else 128)
    args.batches = args.batches or (3 if args.quick else 10) * per_worker
    args.warmup = args.warmup or (1 if args.quick else 2) * per_worker + 1
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.plain_batches = (3 if args.quick else 5) if args.plain_batches is None else args.plain_batches
    if args.plain_batches == 1:
        parser.error("--plain-batches: 0 (skip) or >= 2 (the first is not timed)")
    args.shards = args.shards or max(4, 2 * args.workers)
    # One epoch holds warm-up + timed batches and one spare batch per worker, in whole shards.
    wanted = args.samples or (args.warmup + args.batches + per_worker) * args.batch_size
    args.per_shard = math.ceil(wanted / args.shards)
    for name in ("batch_size", "batches", "warmup", "repeats", "shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.shards < args.workers:
        parser.error(f"--shards {args.shards}: open_clip's loader needs at least one shard per worker ({args.workers})")
    return args


def run_size(args: argparse.Namespace, folder: Path, size: int, device: Optional[torch.device],
             device_note: Optional[str]) -> dict:
    """Every side on the `size` px shards; the per-size part of the JSON line."""
    urls = build_shards(folder, size, args.shards, args.per_shard, args.seed)
    workers, batch_size = args.workers, args.batch_size
    streams: dict[str, tuple[Callable[[], Iterator[int]], Optional[torch.device]]] = {
        "vlp": (lambda: vlp_batches(urls, workers, batch_size, None, "cpu"), None),
        "open_clip": (lambda: open_clip_batches(urls, workers, batch_size, None), None),
    }
    skipped = {}
    device_streams = {
        "vlp_device": ("cpu", lambda: vlp_batches(urls, workers, batch_size, device, "cpu")),
        "open_clip_device": ("cpu", lambda: open_clip_batches(urls, workers, batch_size, device)),
        "vlp_gpu_decode": ("gpu", lambda: vlp_batches(urls, workers, batch_size, device, "gpu")),
    }
    for name, (decode, make_batches) in device_streams.items():
        if device is None:
            skipped[name] = f"skipped: {device_note}"
        elif decode not in args.decode:
            skipped[name] = f"skipped: --decode without {decode}"
        else:
            streams[name] = (make_batches, device)

    best: dict[str, Optional[dict]] = {name: None for name in streams}
    for round_index in range(args.repeats):
        # Interleaved, the order flipped each round: on a shared machine the load drifts over a run.
        names = list(streams) if round_index % 2 == 0 else list(reversed(streams))
        for name in names:
            make_batches, on = streams[name]
            run = functools.partial(measure, make_batches, args.warmup, args.batches, workers, on)
            best[name] = better(best[name], attempt(f"{name} at {size} px", run))

    vlp, open_clip = best["vlp"], best["open_clip"]
    per_worker, worker_cpu = "per_worker_samples_per_s", "worker_cpu_ms_per_sample"
    jpeg_bytes = sum(path.stat().st_size for path in folder.glob("*.tar")) / (args.shards * args.per_shard)
    result: dict[str, Any] = {
        "vlp": vlp, "open_clip": open_clip,
        "ratio": ratio(field(vlp, per_worker), field(open_clip, per_worker)),
        "cpu_ratio": ratio(field(open_clip, worker_cpu), field(vlp, worker_cpu)),
        **{name: best.get(name, skipped.get(name)) for name in device_streams},
        "device_ratio": ratio(field(best.get("vlp_device"), "samples_per_s"),
                              field(best.get("open_clip_device"), "samples_per_s")),
        "samples": args.shards * args.per_shard, "shards": args.shards, "jpeg_kb_mean": round(jpeg_bytes / 1024, 1),
    }
    if args.plain_batches:
        raw = read_raw(folder, args.plain_batches * batch_size)
        plain = {"vlp": attempt(f"plain vlp at {size} px", lambda: measure_plain(lambda: vlp_plain(raw, batch_size))),
                 "open_clip": attempt(f"plain open_clip at {size} px",
                                      lambda: measure_plain(lambda: open_clip_plain(raw, batch_size)))}
        result["plain"] = plain
        # What vlp's loader machinery (tar reading, shuffle, IPC) keeps of the bare work: per worker
        # in wall time (fair only on idle cores: workers + the main process), and in CPU time.
        result["vlp_loader_vs_plain"] = ratio(field(vlp, per_worker), field(plain["vlp"], "samples_per_s"))
        result["vlp_loader_cpu_vs_plain"] = ratio(field(plain["vlp"], "cpu_ms_per_sample"), field(vlp, worker_cpu))
    return result


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    # Workers run torch with one thread (the DataLoader sets it); the plain loops here do too.
    torch.set_num_threads(1)
    # Imported once before any timing, as both trainers have them by the time their loader starts
    # (forked workers inherit them); else the first side's start-up carries 2-3 s of imports.
    import open_clip  # noqa: F401
    import open_clip_train.data  # noqa: F401

    device, device_note = None, None
    if args.device == "cuda":
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            torch.zeros(1, device=device)  # the CUDA context is created before any timing
        else:
            device_note = "--device cuda but torch.cuda.is_available() is False"
            print(f"[loader] {device_note}: the device parts are skipped", file=sys.stderr)
    else:
        device_note = "--device cpu"
    temporary = tempfile.TemporaryDirectory(prefix="vlp-loader-bench-") if args.data is None else None
    root = Path(temporary.name) if temporary is not None else args.data
    try:
        sizes = {str(size): run_size(args, root / f"{size}px", size, device, device_note) for size in args.sizes}
    finally:
        if temporary is not None:
            temporary.cleanup()
    first = sizes.get("256")
    report = {
        "benchmark": "loader", "model": MODEL, "workers": args.workers, "batch_size": args.batch_size,
        "timed_batches": args.batches, "warmup_batches": args.warmup, "repeats": args.repeats,
        "device": args.device if device is not None else "cpu",
        "gpu": torch.cuda.get_device_name(device) if device is not None else None,
        "sizes": sizes,
        "target": {"what": "vlp samples/s per worker >= open_clip's at 256 px (CPU, same run)",
                   "ratio": first.get("ratio") if first else None,
                   "met": bool(first and first.get("ratio") and first["ratio"] >= 1.0)},
        "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
        "quick": args.quick, "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
