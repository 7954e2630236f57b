"""`vlp segment` on the command line: `add_parser(subparsers)` adds it to vlp's parser (cli/);
`python -m vlp.train.segment_cli CONFIG ...` runs the same command on its own.

Kept apart from `segment.py` so that building vlp's parser imports neither torch nor MONAI (as
`vlp.curate.commands`): the handler imports the fine-tune when it runs."""

from __future__ import annotations

import argparse
import json

from vlp.core.config import OVERRIDE_WORD, parse_command_line


def segment_command(args: argparse.Namespace) -> int:
    from vlp.train.segment import compare, load_segment_config, segment

    config = load_segment_config(args.config, args.overrides)
    args.run_dir = config.run_dir
    if args.seeds:
        print(json.dumps(compare(config, args.seeds, args.variants, args.overwrite)))
    else:
        print(json.dumps({"run_dir": str(config.run_dir), **segment(config, overwrite=args.overwrite)}))
    return 0


class ValuesThenOverrides(argparse.Action):
    """A list option (`nargs="+"`) after which overrides may follow: argparse hands a list option
    every word up to the next flag, so in `--seeds 0 1 2 model.encoder=DIR` the override would be
    taken for a seed. Here `key=value` words go to `overrides` and the rest are checked with
    `convert` (type) and `allowed` (choices)."""

    def __init__(self, *args, convert=str, allowed=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.convert, self.allowed = convert, allowed

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = []
        for word in values:
            if OVERRIDE_WORD.match(word):
                namespace.overrides = [*(getattr(namespace, "overrides", None) or []), word]
                continue
            try:
                item = self.convert(word)
            except ValueError:
                parser.error(f"argument {option_string}: invalid value: {word!r}")
            if self.allowed is not None and item not in self.allowed:
                parser.error(f"argument {option_string}: invalid choice: {word!r} (choose from {', '.join(self.allowed)})")
            items.append(item)
        if not items:
            parser.error(f"argument {option_string}: expected at least one value")
        setattr(namespace, self.dest, items)


VARIANTS = ("pretrained", "scratch", "frozen")


def add_parser(subparsers) -> None:
    """Add `segment` to vlp's subcommands."""
    parser = subparsers.add_parser(
        "segment", help="fine-tune MONAI's UNETR on CT lesion masks from a vlp 3-D ViT (Dice per class)",
        description="Segmentation fine-tune (docs/ct.md, Segmentation): results.json, metrics.jsonl and "
                    "plots/prediction.png in runs/NAME; with --seeds, every variant for every seed and the spread.")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in the same run folder")
    parser.add_argument("--seeds", nargs="+", action=ValuesThenOverrides, convert=int, default=None, metavar="SEED",
                        help="run every --variants for each seed and print mean and spread of dice_mean")
    parser.add_argument("--variants", nargs="+", action=ValuesThenOverrides, allowed=VARIANTS, default=list(VARIANTS),
                        metavar="VARIANT", help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.set_defaults(func=segment_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlp.train.segment_cli CONFIG ...`: `vlp segment` with vlp's exit codes (2: bad input, one line)."""
    import sys

    from vlp.core.errors import VlpInputError

    parser = argparse.ArgumentParser(prog="vlp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parse_command_line(parser, ["segment", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except VlpInputError as error:
        print(f"vlp: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
