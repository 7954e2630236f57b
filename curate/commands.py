"""`vlp embed` and `vlp curate` on the command line: `add_parser(subparsers)` adds both.

Kept apart from `embed.py` and `run.py` so that building vlp's parser imports neither torch nor
faiss (`import vlp.cli` takes 0.2 s; the curate modules 4 s): the handlers import them when run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def embed_command(args: argparse.Namespace) -> int:
    from vlp.curate.embed import embed_shards

    summary = embed_shards(args.shards, Path(args.model), Path(args.out), batch_size=args.batch_size,
                           workers=args.workers, device=args.device, precision=args.precision)
    print(json.dumps(summary))
    return 0


def curate_command(args: argparse.Namespace) -> int:
    from vlp.curate.run import curate

    report = curate(args.shards, Path(args.embeddings), Path(args.out), args.config, args.overwrite)
    print(json.dumps({key: report[key] for key in ("samples", "kept", "kept_fraction", "dropped", "shards_written", "out")}))
    return 0


def add_parser(subparsers) -> None:
    """Add `embed` and `curate` to vlp's subcommands."""
    parser = subparsers.add_parser(
        "embed", help="image/caption embeddings and image-text scores of every sample, per shard",
        description="Embed and score every sample of SHARDS with a vlp model into --out, one folder per shard, "
                    "resumably; ranks from RANK/WORLD_SIZE (torchrun -m vlp.cli embed, srun). docs/curation.md")
    parser.add_argument("shards", help="shard spec (brace ranges, '::' lists) or a folder of .tar shards")
    parser.add_argument("--model", required=True, help="a run folder, checkpoint or export of vlp")
    parser.add_argument("--out", required=True, help="embeddings folder (rerun the command to resume)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding samples")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the towers (scores are computed in fp32)")
    parser.set_defaults(func=embed_command)

    parser = subparsers.add_parser(
        "curate", help="filter, deduplicate and balance shards from vlp embed's output into new shards",
        description="Write the samples of SHARDS that pass the filters of --config (a `curate:` section) into "
                    "new shards in --out, with report.json, manifest.parquet and scores.png. docs/curation.md")
    parser.add_argument("shards", help="the shard spec or folder given to vlp embed")
    parser.add_argument("--embeddings", required=True, help="vlp embed's output folder")
    parser.add_argument("--out", required=True, help="folder for the curated shards (not the input folder)")
    parser.add_argument("--config", default=None, help="YAML with a `curate:` section (default: drop bad samples only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier vlp curate run in --out")
    parser.set_defaults(func=curate_command)
