"""vlp.core.files: a write either lands whole or leaves the old file/folder and no temporary."""

import os
import stat

import pytest

from vlp.core.files import atomic_folder, atomic_write


def test_text_bytes_and_mode(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, "first\n")
    atomic_write(target, "zweite Zeile – ü\n")
    assert target.read_text(encoding="utf-8") == "zweite Zeile – ü\n"
    atomic_write(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    script = atomic_write(tmp_path / "job.sbatch", "#!/bin/bash\n", mode=0o755)
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() would create it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "job.sbatch"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, "step_1\n")
    with pytest.raises(TypeError):
        atomic_write(target, None)  # fails after the temporary file was created
    assert target.read_text() == "step_1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_folder_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "one").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "two").write_text("2")
            raise RuntimeError("exporter failed")
    assert [p.name for p in out.iterdir()] == ["one"]
    with atomic_folder(out) as tmp:
        (tmp / "two").write_text("2")
    assert [p.name for p in out.iterdir()] == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
