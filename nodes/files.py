"""DiffO Save Bitstream / Load Bitstream: `.diffo` files in ComfyUI's output and input folders.

Saving never replaces a file (the next free counter is taken, and the write itself is exclusive and atomic);
loading reads only files inside the input folder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..diffo import pipeline
from ..diffo.bitstream import bits_per_pixel
from ..diffo.errors import BitstreamError, OutputExistsError
from ..diffo.fileio import write_atomic
from . import comfy_env
from .types import BITSTREAM, Bitstreams

SUFFIX = ".diffo"


def _inside(folder: Path, relative: str) -> Path:
    """folder/relative, refusing anything that resolves outside `folder` (.., absolute paths, symlinks out)."""
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{relative!r} points outside ComfyUI's {root.name} folder")
    return path


def next_free_path(output_dir: Path, prefix: str) -> Path:
    """`<output>/<prefix>_<counter>.diffo` with a counter above every existing one of that prefix."""
    prefix = prefix.strip() or "DiffO"
    target = _inside(output_dir, prefix + "_00001" + SUFFIX)
    folder, stem = target.parent, Path(prefix).name
    pattern = re.compile(re.escape(stem) + r"_(\d+)" + re.escape(SUFFIX) + "$")
    used = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else ()) if (m := pattern.match(p.name))]
    return folder / f"{stem}_{max(used, default=0) + 1:05d}{SUFFIX}"


def save_streams(streams: list[bytes], output_dir: Path, prefix: str) -> list[Path]:
    paths = []
    for data in streams:
        while True:
            path = next_free_path(output_dir, prefix)
            try:
                paths.append(write_atomic(path, data))
                break
            except OutputExistsError:  # another save took this counter meanwhile: take the next one
                continue
            except OSError as e:  # disk full, read-only folder...: say which file, and what is already safe
                done = f"; already saved: {', '.join(p.name for p in paths)}" if paths else ""
                raise OSError(e.errno, f"could not save {path}: {e.strerror or e} (no partial file was left"
                                       f"{done})") from e
    return paths


def summary(data: bytes, name: str) -> str:
    bs = pipeline.read_header(data)
    return (f"{name}: {len(data)} bytes, {bits_per_pixel(len(data), bs.width, bs.height):.4f} bpp, "
            f"{bs.width}x{bs.height}, rate level {bs.rate:.3f}, model {bs.fingerprint.hex()}")


class DiffOSaveBitstream:
    DESCRIPTION = ("Writes each stream as a .diffo file into ComfyUI's output folder (prefix + counter; an "
                   "existing file is never replaced) and shows the sizes on the node.")
    CATEGORY = "DiffO/bitstream"
    SEARCH_ALIASES = ["save diffo", "write bitstream", "save compressed", "export diffo"]
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bitstream": (BITSTREAM, {"tooltip": "From DiffO Encode."}),
            "filename_prefix": ("STRING", {"default": "diffo/DiffO", "tooltip":
                                "File name prefix, may start with subfolders: diffo/DiffO → "
                                "output/diffo/DiffO_00001.diffo."}),
        }}

    def save(self, bitstream, filename_prefix):
        out = comfy_env.output_directory()
        paths = save_streams(list(bitstream), out, filename_prefix)
        lines = [summary(d, p.relative_to(out.resolve()).as_posix()) for d, p in zip(bitstream, paths)]
        return {"ui": {"text": lines}}


def list_streams() -> list[str]:
    """The .diffo files in the input folder and its subfolders, as POSIX paths relative to it."""
    root = comfy_env.input_directory()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*" + SUFFIX) if p.is_file())


class DiffOLoadBitstream:
    DESCRIPTION = ("Reads a .diffo file from ComfyUI's input folder (upload one with the button). Shows its "
                   "header: size, bpp, rate level and the model that made it.")
    CATEGORY = "DiffO/bitstream"
    SEARCH_ALIASES = ["open diffo", "read bitstream", "load compressed", "import diffo"]
    RETURN_TYPES = (BITSTREAM, "STRING")
    RETURN_NAMES = ("bitstream", "info")
    OUTPUT_TOOLTIPS = ("The stream, for DiffO Decode or DiffO Entropy Decode.",
                       "Its header in words: size, bpp, rate level, model fingerprint.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "bitstream_file": (list_streams(), {"diffo_upload": True, "tooltip":
                               "A .diffo file in ComfyUI/input (subfolders too)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, bitstream_file):
        path = _inside(comfy_env.input_directory(), bitstream_file)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""

    @classmethod
    def VALIDATE_INPUTS(cls, bitstream_file):
        try:
            path = _inside(comfy_env.input_directory(), bitstream_file)
        except ValueError as e:
            return str(e)
        if path.suffix != SUFFIX or not path.is_file():
            return f"no .diffo file {bitstream_file!r} in ComfyUI's input folder"
        return True

    def load(self, bitstream_file):
        path = _inside(comfy_env.input_directory(), bitstream_file)
        if path.suffix != SUFFIX:
            raise ValueError(f"{bitstream_file!r} is not a .diffo file")
        data = path.read_bytes()
        try:
            pipeline.read_header(data)  # a damaged or foreign file fails here, naming the problem
        except BitstreamError as e:
            raise type(e)(f"{bitstream_file}: {e}") from e
        return (Bitstreams([data]), summary(data, bitstream_file))
