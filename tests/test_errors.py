"""Bugs are not bad input: only a `VlpInputError` is one line and exit 2; a `KeyError` or
`ValueError` raised by vlp's own code (or a plug-in head's) is exit 1 with its traceback, kept in
the run folder's `errors.log` too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_config

from vlp import cli
from vlp.core import errors
from vlp.core.registry import Registry

DRIVER = Path(__file__).with_name("bug_driver.py")


def run_with_bug(config: Path, **bug: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **bug)
    return subprocess.run([sys.executable, str(DRIVER), "train", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("bug", [{"VLP_BUG_KEYERROR": "some_key"}, {"VLP_BUG_READS": "no_such_tensor"}],
                         ids=["plain_keyerror", "no_such_tensor"])
def test_a_keyerror_in_a_head_is_a_bug_with_its_traceback(tmp_path, digits_dir, bug):
    config = tiny_config(tmp_path, digits_dir, train={"steps": 2, "warmup_steps": 0, "checkpoint_every": 0})
    proc = run_with_bug(config, **bug)
    key = next(iter(bug.values()))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and f"KeyError: '{key}'" in proc.stderr
    assert "buggy_forward" in proc.stderr  # the frame that raised it is shown
    assert f"vlp: error: {key}" not in proc.stderr  # not dressed up as a config typo
    log = tmp_path / "runs" / "tiny" / "errors.log"
    assert f"traceback also in {log}" in proc.stderr
    assert "buggy_forward" in log.read_text() and f"KeyError: '{key}'" in log.read_text()


def test_input_errors_are_one_line_exit_2(tmp_path, digits_dir, capsys):
    # An unknown key, a missing shard, an unknown registry name: each one line, exit 2.
    config = tiny_config(tmp_path, digits_dir)
    assert cli.main(["train", str(config), "train.stepz=3"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    tree = yaml.safe_load(config.read_text())
    tree["data"]["train"] = [{"urls": str(tmp_path / "none-{000000..000001}.tar")}]
    config.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "vlp: error: shard " in err and "does not exist" in err and "Traceback" not in err
    assert cli.main(["eval", "zeroshott", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown evaluator 'zeroshott'" in err and 'Did you mean "zeroshot"?' in err and err.count("\n") == 1


def test_a_plain_valueerror_is_exit_1_with_traceback(monkeypatch, capsys):
    def broken(args):
        raise ValueError("an invariant inside vlp broke")

    monkeypatch.setattr(cli, "cmd_export", broken)
    assert cli.main(["export", "x", "--out", "y", "--format", "open_clip"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: an invariant inside vlp broke" in err
    assert "vlp: internal error (ValueError)" in err


def test_every_vlp_input_error_keeps_its_builtin_base():
    # Callers that caught the builtin before the family existed still catch it.
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DataError, ValueError)
    assert issubclass(errors.RunExists, FileExistsError) and issubclass(errors.InputNotFound, FileNotFoundError)
    registry = Registry("widget")
    with pytest.raises(errors.UnknownName) as caught:
        registry.get("gizmo")
    assert isinstance(caught.value, KeyError) and str(caught.value).startswith("unknown widget 'gizmo'")
    registry.register("gizmo")(object)
    with pytest.raises(KeyError) as duplicate:  # registering twice is vlp's own bug, not input
        registry.register("gizmo")(object)
    assert not isinstance(duplicate.value, errors.VlpInputError)
