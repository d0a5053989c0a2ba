"""Writing outputs so that data is never lost.

Every output goes to a temporary file in the target's directory, is flushed and fsync'ed, and only then
appears under its final name in one atomic step. Without ``force`` an existing file is never touched,
even one that another process creates while we write (the final step is ``os.link``, which fails if
the name exists). Whatever goes wrong while writing, the temporary file is removed and the error
re-raised: no partial output, and an existing file stays as it was.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Union

from .errors import ImageInputError, OutputExistsError

__all__ = ["write_atomic", "save_image_atomic"]

PathLike = Union[str, "os.PathLike[str]"]

# errnos meaning "this file system cannot hard-link": fall back to an exclusive create + replace
_NO_LINK_ERRNOS = {
    getattr(errno, n) for n in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "EXDEV", "ENOSYS", "EMLINK", "EACCES")
    if hasattr(errno, n)
}


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} exists; pass --force to overwrite it")


def _default_file_mode() -> int:
    """0o666 minus the process umask (what a plain open() would create), read without changing it."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # fallback (not thread-safe for the instant it takes)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the new directory entry durable (POSIX only)."""
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Raises OutputExistsError (touching nothing) if ``path`` exists and ``force`` is false. Missing
    parent folders are created. See the module docstring for the guarantees."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic expects bytes, not {type(data).__name__}")
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise _exists_error(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "cannot overwrite a directory with a file", str(path))
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)

    if force and path.exists():
        try:
            mode = path.stat().st_mode & 0o7777  # keep the permissions of the file we replace
        except OSError:
            mode = _default_file_mode()
    else:
        mode = _default_file_mode()

    tmp = tempfile.NamedTemporaryFile(dir=parent, delete=False, prefix=f".{path.name}.", suffix=".tmp")
    tmp_name = tmp.name
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        with suppress(OSError, NotImplementedError):
            os.chmod(tmp_name, mode)  # NamedTemporaryFile creates 0600
        if force:
            os.replace(tmp_name, path)
        else:
            _publish_exclusive(tmp_name, path)
        _fsync_dir(parent)
    finally:
        # after os.replace the temp name is gone; after os.link (or on any error) it still exists
        with suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return path


def _publish_exclusive(tmp_name: str, path: Path) -> None:
    """Give the fully written temp file the name ``path`` only if nothing has that name."""
    try:
        os.link(tmp_name, path)
        return
    except FileExistsError:
        raise _exists_error(path) from None
    except (AttributeError, NotImplementedError):
        pass  # no hard links on this platform
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
    # Fallback: reserve the name exclusively, then move the complete data over the reservation.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise _exists_error(path) from None
    os.close(fd)
    try:
        os.replace(tmp_name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(path)  # our own empty reservation
        raise


def save_image_atomic(path: PathLike, img, *, force: bool = False) -> Path:
    """Save an image (tensor [3, H, W] float in [0, 1], or a PIL image) atomically and return the path.

    The format follows the suffix (any format PIL can write; PNG when there is no suffix). The image is
    fully encoded in memory before anything is written, so an encoding error leaves the disk untouched.
    Raises OutputExistsError if ``path`` exists and ``force`` is false."""
    from PIL import Image

    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise _exists_error(path)

    suffix = path.suffix.lower()
    if not suffix:
        fmt = "PNG"
    else:
        fmt = Image.registered_extensions().get(suffix)
        if fmt is None or fmt not in Image.SAVE:
            raise ValueError(f"cannot tell an image format PIL can write from the suffix {suffix!r}: {path}")

    if isinstance(img, Image.Image):
        pil = img
    else:
        from .image import to_pil

        pil = to_pil(img)

    params = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = 95
    buf = io.BytesIO()
    try:
        pil.save(buf, format=fmt, **params)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageInputError(f"cannot save a {pil.mode} image as {fmt} ({exc}): {path}") from exc
    return write_atomic(path, buf.getvalue(), force=force)
