"""Config loading: typed validation, dotted overrides, and error messages that name the key."""

from pathlib import Path

import pytest
import yaml

from vlp.train.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def test_every_config_in_configs_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.name and config.model.heads_dict(), path


def test_overrides_are_typed_and_nested():
    config = load_config(DEMO, ["train.steps=200", "model.image.width=64", "evals.0.batch_size=32", "train.betas=[0.9, 0.95]"])
    assert config.train.steps == 200 and isinstance(config.train.steps, int)
    assert config.model.image.width == 64
    assert config.evals[0].batch_size == 32
    assert config.train.betas == (0.9, 0.95)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(DEMO, ["train.steps=123"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.image.widht=3", r'model\.image\.widht: unknown key\. Did you mean "width"\?'),
        ("model.heads.clipp={}", r'model\.heads\.clipp: unknown key\. Did you mean "clip"\?'),
        ("train.lrr=0.1", r'train\.lrr: unknown key\. Did you mean "lr"\?'),
        ("data.train.0.url=x", r'data\.train\.0\.url: unknown key\. Did you mean "urls"\?'),
        ("train.steps=abc", r"train\.steps: Input should be a valid integer"),
        ("deepspeed.zero_stage=4", r"deepspeed\.zero_stage: .*less than or equal to 3"),
        ("deepspeed.precision=fp8", r"deepspeed\.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
        ("model.image.embed_dim=64", r"model\.image\.embed_dim=64 contradicts model\.embed_dim=128"),
        ("train.warmup_steps=5000", r"train\.warmup_steps=5000 must be below train\.steps"),
        ("model.image.type=resnet", r"model\.image: Input tag 'resnet'"),
        ("name=../../etc", r"name: .*names the run folder"),
        ("model.heads={}", r"model\.heads: name at least one head"),
        ("data.train.0.urls=pipe:curl -s http://x/{0..3}.tar", r"data\.train\.0\.urls: 'pipe:' URLs run shell commands"),
        ("evals.0.data=pipe:rm -rf /", r"evals\.0\.data: 'pipe:' URLs run shell commands"),
    ],
)
def test_bad_values_name_the_key_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_channels_last_is_refused_under_zero():
    load_config(DEMO, ["train.channels_last=true"])  # ZeRO 0: fine
    with pytest.raises(ConfigError, match=r"train\.channels_last needs deepspeed\.zero_stage 0 \(got 2\)"):
        load_config(DEMO, ["train.channels_last=true", "deepspeed.zero_stage=2"])


def test_head_that_needs_sub_captions_refuses_a_config_without_them():
    with pytest.raises(ConfigError, match=r"model\.heads\.flair needs data\.sub_captions > 0"):
        load_config(ROOT / "configs" / "flair_shapes.yaml", ["data.sub_captions=0"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(DEMO, ["train.steps"])
    with pytest.raises(ConfigError, match="evals has no item 7"):
        load_config(DEMO, ["evals.7.batch_size=1"])
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        load_config(DEMO, ["train.steps.x=1"])


def test_yaml_object_tags_are_refused(tmp_path):
    marker = tmp_path / "constructed"
    path = tmp_path / "evil.yaml"
    path.write_text(
        DEMO.read_text() + f"\nextra: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    with pytest.raises(ConfigError, match=r"evil\.yaml.*invalid YAML"):
        load_config(path)
    assert not marker.exists()


def test_duplicate_keys_and_missing_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_required_section(tmp_path):
    tree = yaml.safe_load(DEMO.read_text())
    del tree["train"]
    with pytest.raises(ConfigError, match="train: required key is missing"):
        load_config(tree=tree)


@pytest.mark.parametrize("argv,overrides", [
    (["train", "c.yaml", "--overwrite", "train.steps=5"], ["train.steps=5"]),
    (["train", "c.yaml", "a.b=1", "--nproc", "2", "c=2", "--resume", "latest", "d.e=[1, 2]"], ["a.b=1", "c=2", "d.e=[1, 2]"]),
    (["demo", "--steps", "3", "train.lr=0.1", "--out", "runs/x", "seed=1"], ["train.lr=0.1", "seed=1"]),
    (["submit", "c.yaml", "--dry-run", "train.steps=5", "--nodes", "2"], ["train.steps=5"]),
    # after a list option's values (argparse hands --seeds every word up to the next flag)
    (["segment", "c.yaml", "--seeds", "0", "1", "model.encoder=x", "--variants", "scratch", "b=2"], ["model.encoder=x", "b=2"]),
])
def test_overrides_anywhere_among_the_flags(argv, overrides):
    """People type `vlp train CONFIG --overwrite train.steps=5`; argparse alone refuses it."""
    from vlp import cli

    args = cli.parse_command_line(cli.build_parser(), argv)
    assert args.overrides == overrides


@pytest.mark.parametrize("argv", [
    ["train", "c.yaml", "--overwrite", "--bogus"],
    ["train", "c.yaml", "--overwrite", "train.steps=5", "stray"],
    ["export", "ckpt", "--out", "x", "--format", "timm", "train.steps=5"],  # export takes no overrides
])
def test_unknown_words_among_the_flags_still_exit_2(argv, capsys):
    from vlp import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
