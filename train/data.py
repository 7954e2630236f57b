"""Data set-up shared by `vlp train`, `vlp demo` and the evaluators: build offline data if absent."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from vlp.core.errors import InputNotFound
from vlp.data_pipelines.config import DataConfig
from vlp.data_pipelines.errors import DataError
from vlp.data_pipelines.sharding import expand_urls
from vlp.data_pipelines.tar_reader import is_local, local_path


def missing_shards(spec: str) -> list[str]:
    return [u for u in expand_urls(spec) if is_local(u) and not Path(local_path(u)).is_file()]


STAMP = ".vlp-build.json"  # what a `build` wrote into its folder: source and options


def _check_stamp(out: Path, build: str, options: dict) -> None:
    """Shards built by an earlier config with other options must not pass for this config's."""
    stamp = out / STAMP
    if not stamp.is_file():
        return
    earlier = json.loads(stamp.read_text())
    wanted = {"source": build, "options": options}
    if earlier != json.loads(json.dumps(wanted, default=str)):
        raise DataError(
            f"{out} was built as {earlier['source']} with options {earlier['options']}, this config asks for "
            f"{build} with {options}: remove {out} to rebuild it, or set data.build_dir to another folder"
        )


def ensure_built(spec: str, build: str | None, build_dir: str | None, options: dict, is_main: bool) -> None:
    """Build `build` into `build_dir` when shards named by `spec` are missing (rank 0 builds;
    the caller barriers). Raises FileNotFoundError naming the first missing shard otherwise, and
    DataError when the folder was built by this pipeline with other source options."""
    missing = missing_shards(spec)
    if build is not None:
        out = Path(build_dir or Path(local_path(expand_urls(spec)[0])).parent)
        _check_stamp(out, build, options)
    if not missing:
        return
    if build is None:
        raise InputNotFound(f"shard {missing[0]} does not exist (and no `build` source is configured)")
    if not is_main:
        return
    from vlp.data_pipelines.sources import build as build_source

    out = Path(build_dir or Path(missing[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    # A lock so two runs sharing a data folder do not build it at the same time.
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if missing_shards(spec):
                build_source(build, out, **options)
                (out / STAMP).write_text(json.dumps({"source": build, "options": options}, default=str) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    still = missing_shards(spec)
    if still:
        raise DataError(f"source {build!r} built {out} but shard {still[0]} is still missing: check the urls")


def ensure_train_data(cfg: DataConfig, is_main: bool) -> None:
    for source in cfg.train:
        ensure_built(source.urls, cfg.build, cfg.build_dir, cfg.build_options, is_main)


def ensure_eval_data(evals: list, data_cfg: DataConfig, is_main: bool) -> None:
    for ev in evals:
        if getattr(ev, "data", None):
            build = ev.build or data_cfg.build
            build_dir = ev.build_dir or data_cfg.build_dir
            ensure_built(ev.data, build, build_dir, data_cfg.build_options if build == data_cfg.build else {}, is_main)

