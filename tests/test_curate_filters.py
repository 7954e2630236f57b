"""The filters of `vlp curate` against expectations worked out by hand, and the `curate:` config's
errors. Pure numpy inputs: no model, no shards."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from vlp.core.errors import ConfigError
from vlp.curate import filters
from vlp.curate.config import (BalanceFilter, CaptionFilter, DedupFilter, ImageFilter, ScoreFilter,
                               load_curate_config)

ALL = np.ones(5, bool)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees)), 0.0]


# ------------------------------------------------------------------ score
def test_score_min_keeps_at_or_above():
    scores = np.array([0.1, 0.3, 0.25, 0.2, 0.9], np.float32)
    drops = filters.score_drops(scores, ALL, ALL, ScoreFilter(min=0.25))
    assert drops.tolist() == [True, False, False, True, False]


def test_score_top_fraction_of_the_pool_ties_to_the_earlier_sample():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5, float("nan")], np.float32)
    embedded = np.array([True] * 5 + [False])
    alive = embedded.copy()
    alive[1] = False  # dropped by an earlier filter: it still counts in the pool's ranking
    # ceil(0.6 * 5) = 3 best: index 1 (0.9), then the 0.5s in order: 0 and 2.
    drops = filters.score_drops(scores, embedded, alive, ScoreFilter(top_fraction=0.6))
    assert drops.tolist() == [False, False, False, True, True, False]


# ------------------------------------------------------------------ captions
def test_caption_rules_in_order(tmp_path):
    (tmp_path / "block.txt").write_text("Buy Now\n\n")
    captions = ["a photo of a dog on the grass", "dog", "le chat est noir sur le canapé de la maison",
                "BUY NOW a photo of a cat in the garden", "a photo of a cat in the garden at night"]
    config = CaptionFilter(min_words=2, languages=["en"], blocklist="block.txt")
    drops = filters.caption_drops(captions, ALL, config, tmp_path)
    assert drops["caption_length"].tolist() == [False, True, False, False, False]
    assert drops["caption_language"].tolist() == [False, False, True, False, False]
    assert drops["caption_blocklist"].tolist() == [False, False, False, True, False]


def test_caption_max_chars_and_dead_samples_untouched():
    captions = ["short one", "a much longer caption than allowed", "x"]
    alive = np.array([True, True, False])
    drops = filters.caption_drops(captions, alive, CaptionFilter(max_chars=10), Path("."))
    assert drops["caption_length"].tolist() == [False, True, False]


# ------------------------------------------------------------------ duplicates
def test_exact_duplicates_keep_the_first_alive_copy():
    hashes = np.array(["a", "b", "a", "c", "b", "a"], dtype=object)
    drops, of = filters.exact_duplicate_drops(hashes, np.ones(6, bool))
    assert drops.tolist() == [False, False, True, False, True, True]
    assert of.tolist() == [-1, -1, 0, -1, 1, 0]
    alive = np.array([False, True, True, True, True, True])  # the first copy already dropped
    drops, of = filters.exact_duplicate_drops(hashes, alive)
    assert drops.tolist() == [False, False, False, False, True, True]
    assert of.tolist() == [-1, -1, -1, -1, 1, 2]


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_near_duplicates_greedy_in_order(index):
    # 0 ~ 1 (20 deg), 1 ~ 2 (20 deg), 0 !~ 2 (40 deg) at cos 25 deg: keep 0, drop 1, keep 2
    # (2's only earlier duplicate, 1, was dropped). 3 is far from all; 4 duplicates 2.
    image = np.array([unit(0), unit(20), unit(40), unit(120), unit(45)], np.float16)
    config = DedupFilter(threshold=math.cos(math.radians(25)), index=index)
    drops, of = filters.near_duplicate_drops(image, ALL, config)
    assert drops.tolist() == [False, True, False, False, True]
    assert of.tolist() == [-1, 0, -1, -1, 2]


def test_near_duplicates_kept_copy_is_the_earliest_alive(capsys):
    image = np.array([unit(0), unit(1), unit(2), unit(90)], np.float16)
    config = DedupFilter(threshold=0.99)
    drops, of = filters.near_duplicate_drops(image, np.array([False, True, True, True]), config)
    assert drops.tolist() == [False, False, True, False]
    assert of.tolist() == [-1, -1, 1, -1]
    # The same set in another order of visits keeps the earliest of that order: determinism is
    # the (shard, offset) order, not the index's internals.
    assert "near duplicates" not in capsys.readouterr().err  # one query block: no bar
    again, _ = filters.near_duplicate_drops(image, np.array([False, True, True, True]), config, query_block=1)
    assert again.tolist() == drops.tolist()
    assert "vlp curate: near duplicates" in capsys.readouterr().err  # several blocks: progress shown


# ------------------------------------------------------------------ MetaCLIP balancing
def test_balance_caps_each_entry_and_drops_unmatched():
    captions = ["a cat", "a cat here", "cat again", "one more cat", "a dog", "nothing", "a cat and a dog"]
    keys = [f"k{i}" for i in range(len(captions))]
    config = BalanceFilter(metadata=["cat", "dog"], per_entry=2, seed=3)
    drops, counts = filters.balance_drops(captions, keys, np.ones(len(captions), bool), config, Path("."))
    assert counts == {"cat": 5, "dog": 2}
    cat = [0, 1, 2, 3, 6]
    chosen = sorted(cat, key=lambda i: (filters.sample_draw(3, keys[i]), i))[:2]
    kept = set(chosen) | {4, 6}  # "dog" has 2 matches <= per_entry: both kept, 6 included
    assert [i for i in range(len(captions)) if not drops[i]] == sorted(kept)
    assert drops[5]  # matches no entry


def test_balance_draw_is_independent_of_order():
    captions = [f"cat number {i}" for i in range(20)]
    keys = [f"sample{i:02d}" for i in range(20)]
    config = BalanceFilter(metadata=["cat"], per_entry=5)
    drops, _ = filters.balance_drops(captions, keys, np.ones(20, bool), config, Path("."))
    reverse, _ = filters.balance_drops(captions[::-1], keys[::-1], np.ones(20, bool), config, Path("."))
    assert (~drops).sum() == 5
    assert sorted(np.array(keys)[~drops]) == sorted(np.array(keys[::-1])[~reverse])


# ------------------------------------------------------------------ image-based filtering
def test_image_filter_keeps_the_clusters_near_the_target():
    rng = np.random.default_rng(0)
    a = np.array(unit(0)) + 0.01 * rng.standard_normal((30, 3))
    b = np.array(unit(90)) + 0.01 * rng.standard_normal((30, 3))
    image = np.concatenate([a, b]).astype(np.float16)
    target = (np.array(unit(5)) + 0.01 * rng.standard_normal((4, 3))).astype(np.float16)
    drops = filters.image_filter_drops(image, np.ones(60, bool), target, ImageFilter(target="t", clusters=2))
    assert drops.tolist() == [False] * 30 + [True] * 30


# ------------------------------------------------------------------ config
def test_config_errors_name_the_dotted_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("curate:\n  score: {minn: 0.2}\n")
    with pytest.raises(ConfigError, match=r"curate\.score\.minn: unknown key"):
        load_curate_config(path)
    path.write_text("curate:\n  score: {min: 0.2, top_fraction: 0.3}\n")
    with pytest.raises(ConfigError, match="set exactly one of min and top_fraction"):
        load_curate_config(path)
    path.write_text("curate:\n  dedup: {threshold: 1.5}\n")
    with pytest.raises(ConfigError, match=r"curate\.dedup\.threshold"):
        load_curate_config(path)
    path.write_text("curate:\n  balance: {metadata: missing.txt, per_entry: 3}\n")
    config, base = load_curate_config(path)
    with pytest.raises(ConfigError, match=r"curate\.balance\.metadata: .*missing\.txt: no such file"):
        config.balance.entries(base)


def test_repo_curate_configs_validate():
    # configs/curate/, not configs/: tests/test_config.py reads every configs/*.yaml as an experiment.
    root = Path(__file__).resolve().parents[1] / "configs" / "curate"
    found = sorted(root.glob("*.yaml"))
    assert found
    for path in found:
        load_curate_config(path)
