"""Tests for diffo.fileio: atomic writes that never lose data."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffo import fileio
from diffo.errors import OutputExistsError
from diffo.fileio import save_image_atomic, write_atomic


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_new_file(tmp_path):
    p = tmp_path / "out.bin"
    assert write_atomic(p, b"hello") == p
    assert p.read_bytes() == b"hello"
    assert _leftovers(tmp_path) == []


def test_permissions_follow_umask(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    p = tmp_path / "perm.bin"
    write_atomic(p, b"x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_existing_not_overwritten(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"original")
    with pytest.raises(OutputExistsError, match="exists; pass --force to overwrite it"):
        write_atomic(p, b"new")
    assert p.read_bytes() == b"original"
    assert _leftovers(tmp_path) == []
    assert isinstance(OutputExistsError("x"), FileExistsError)


def test_force_overwrites(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(b"original")
    write_atomic(p, b"new", force=True)
    assert p.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_parent_dirs_created(tmp_path):
    p = tmp_path / "a" / "b" / "c" / "out.bin"
    write_atomic(str(p), b"deep")
    assert p.read_bytes() == b"deep"


def test_concurrent_creator_not_overwritten(tmp_path, monkeypatch):
    """A file that appears while we write (after the existence check) is not clobbered without force."""
    p = tmp_path / "race.bin"
    real_fsync = os.fsync

    def fsync_then_someone_creates(fd):
        real_fsync(fd)
        if not p.exists():
            p.write_bytes(b"theirs")

    monkeypatch.setattr(fileio.os, "fsync", fsync_then_someone_creates)
    with pytest.raises(OutputExistsError):
        write_atomic(p, b"ours")
    assert p.read_bytes() == b"theirs"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["fsync", "replace", "link", "write"])
@pytest.mark.parametrize("force", [False, True])
def test_failure_leaves_no_temp_and_old_file_intact(tmp_path, monkeypatch, where, force):
    p = tmp_path / "out.bin"
    if force:
        p.write_bytes(b"original")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if where == "write":
        import tempfile

        real_ntf = tempfile.NamedTemporaryFile

        def ntf(*a, **k):
            f = real_ntf(*a, **k)

            class Wrapped:
                name = f.name

                def write(self, data):
                    f.write(data[:2])
                    f.flush()
                    boom()

                def __getattr__(self, attr):
                    return getattr(f, attr)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()
                    return False

            return Wrapped()

        monkeypatch.setattr(fileio.tempfile, "NamedTemporaryFile", ntf)
    else:
        monkeypatch.setattr(fileio.os, where, boom)

    should_fail = where in ("fsync", "write") or (where == "replace" and force) or (where == "link" and not force)
    if should_fail:
        with pytest.raises(OSError, match="No space left on device"):
            write_atomic(p, b"new data", force=force)
        if force:
            assert p.read_bytes() == b"original"
        else:
            assert not p.exists()
    else:
        write_atomic(p, b"new data", force=force)
        assert p.read_bytes() == b"new data"
    assert _leftovers(tmp_path) == []
    assert sorted(x.name for x in tmp_path.iterdir()) == (["out.bin"] if (force or not should_fail) else [])


def test_link_unsupported_falls_back(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(1, "Operation not permitted")  # EPERM, e.g. FAT / some network file systems

    monkeypatch.setattr(fileio.os, "link", no_link)
    p = tmp_path / "out.bin"
    write_atomic(p, b"data")
    assert p.read_bytes() == b"data"
    with pytest.raises(OutputExistsError):
        write_atomic(p, b"other")
    assert p.read_bytes() == b"data"
    assert _leftovers(tmp_path) == []


def test_save_image_tensor_png(tmp_path):
    x = torch.rand(3, 5, 7)
    p = save_image_atomic(tmp_path / "sub" / "img.png", x)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (7, 5)
        arr = np.asarray(im)
    assert np.array_equal(arr, (x * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    with pytest.raises(OutputExistsError):
        save_image_atomic(p, torch.zeros(3, 5, 7))
    with Image.open(p) as im:
        assert np.array_equal(np.asarray(im), arr)
    save_image_atomic(p, torch.zeros(3, 5, 7), force=True)
    with Image.open(p) as im:
        assert np.asarray(im).max() == 0
    assert _leftovers(p.parent) == []


def test_save_image_by_suffix_and_pil(tmp_path):
    im = Image.new("RGB", (4, 4), (10, 200, 30))
    p = save_image_atomic(tmp_path / "img.jpg", im)
    with Image.open(p) as chk:
        assert chk.format == "JPEG"
    p = save_image_atomic(tmp_path / "noext", im)
    with Image.open(p) as chk:
        assert chk.format == "PNG"
    with pytest.raises(ValueError):
        save_image_atomic(tmp_path / "img.notaformat", im)
    assert not (tmp_path / "img.notaformat").exists()
