"""Collections: many files in, a mirrored tree out (`diffo compress photos/ -o archive/`), with the model
loaded once.

- Inputs are files, folders (searched recursively) and glob patterns; `a/b.jpg` under an input folder becomes
  `OUT/a/b.diffo` (decompressing: `OUT/a/b.png`).
- Problems with the inputs (missing, not an image, a damaged stream, two inputs with one output) are found
  before the model loads, all at once, by reading headers only (no torch); each such file is reported and
  the rest go on. The run ends with a summary; the CLI exits with 1 if any file failed.
- Resumable: an output that exists and is valid (a stream that parses and was made by this model; an image
  that opens) is skipped; anything else is redone. Outputs are written atomically, so an interrupted run leaves
  no partial file: it loses at most the files in flight.
- A manifest (JSON lines: source, output, bytes, bpp, rate level, model fingerprint, seconds, status, error)
  grows beside the outputs as files finish.
- Sharding: `shard=(rank, world)` takes every world-th file of the sorted list, from `rank`. Processes
  launched by torchrun or `accelerate launch` (RANK / WORLD_SIZE in the environment) or given `--shard
  RANK/WORLD` on several machines over a shared folder split one job without talking to each other; each
  shard has its own manifest. Encoding is deterministic, so the bytes are those of a single-process run.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .bitstream import MAX_PIXELS, MAX_SIDE, Bitstream, bits_per_pixel
from .errors import BitstreamError, DiffoError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".avif", ".jxl", ".ppm"}
STREAM_SUFFIXES = {".diffo"}
MANIFEST = "manifest.jsonl"


@dataclass
class Job:
    """One file of a collection and what became of it."""

    source: Path
    output: Path
    status: str = "todo"  # todo | done | skipped (valid output from an earlier run) | failed
    error: str = ""
    bytes: int | None = None
    bpp: float | None = None
    rate: float | None = None
    fingerprint: str | None = None
    seconds: float | None = None
    stream: Bitstream | None = field(default=None, repr=False)  # the parsed .diffo (input or earlier output)

    def record(self) -> dict:
        row = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "stream"}
        return {k: v for k, v in row.items() if v is not None and v != ""} | {"status": self.status}


@dataclass
class Summary:
    jobs: list[Job] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(j.status == status for j in self.jobs)

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "failed"]

    def text(self) -> str:
        lines = [f"{self.count('done')} done, {self.count('skipped')} already done, {self.count('failed')} failed "
                 f"of {len(self.jobs)}"]
        lines += [f"  failed: {j.source}: {j.error}" for j in self.failed]
        return "\n".join(lines)


def is_batch(inputs: list[str], output: str | None) -> bool:
    """True when the command works on a collection: several inputs, a folder, a glob, or an output folder."""
    return (len(inputs) > 1 or any(Path(i).is_dir() or _is_glob(i) for i in inputs)
            or (output is not None and (Path(output).is_dir() or output.endswith(("/", os.sep)))))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[") and not Path(text).exists()


def gather(inputs: Iterable[str], suffixes: set[str]) -> tuple[list[tuple[Path, Path]], list[Job]]:
    """(source, path relative to the output folder) of every input file, sorted; and the inputs that do not
    exist as failed jobs."""
    found, missing = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
            found += [(f, f.relative_to(p)) for f in files]
        elif p.is_file():
            found.append((p, Path(p.name)))
        elif _is_glob(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                missing.append(Job(p, p, "failed", f"no file matches {item}"))
            found += [(m, Path(m.name)) for m in matches]
        else:
            missing.append(Job(p, p, "failed", f"file not found: {p}"))
    return found, missing


def plan(found: list[tuple[Path, Path]], out_dir: Path, suffix: str) -> list[Job]:
    """One job per input, output OUT/relative path with `suffix`; two inputs with one output both fail."""
    jobs = [Job(src, out_dir / rel.with_suffix(suffix)) for src, rel in found]
    seen: dict[Path, Job] = {}
    for job in jobs:
        if job.output in seen:
            for j in (seen[job.output], job):
                j.status, j.error = "failed", f"two inputs would write {job.output}: rename one"
        seen.setdefault(job.output, job)
    return jobs


def parse_shard(text: str | None) -> tuple[int, int]:
    """'2/4' → (2, 4); None → RANK / WORLD_SIZE from the environment (torchrun, accelerate launch) or (0, 1)."""
    if text is None:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    else:
        try:
            rank, world = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard: {text!r} is not RANK/WORLD (e.g. 0/4)") from None
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world}: the rank must be in 0..{world - 1}")
    return rank, world


def shard(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """Every world-th job from `rank`: a deterministic split of the sorted list, without communication."""
    return jobs[rank::world]


def manifest_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / (MANIFEST if world == 1 else f"manifest.shard-{rank}-of-{world}.jsonl")


class Manifest:
    """Appends one JSON line per finished file (flushed at once: a killed run keeps what it recorded)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, job: Job) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(job.record()) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ checks (no torch)
def check_image(path: Path) -> str | None:
    """Why `path` cannot be compressed, from its header alone (PIL identifies it without decoding), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"not an image (or an unsupported format): {e}"
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})"
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        return f"image is {w}x{h}; DiffO codes up to {MAX_SIDE} pixels a side and {MAX_PIXELS} in all"
    return None


def read_stream(path: Path) -> Bitstream:
    """The parsed header and sub-streams of a `.diffo` file (BitstreamError names the damage)."""
    return Bitstream.from_bytes(path.read_bytes())


def earlier_stream(path: Path) -> Bitstream | None:
    """An earlier output that parses, or None (missing, or left damaged: it is redone)."""
    try:
        return read_stream(path)
    except (OSError, BitstreamError):
        return None


def image_done(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any unreadable leftover is redone
        return False


def precheck(jobs: list[Job], kind: str) -> None:
    """Mark failed every job whose input is unusable, reading headers only (before any model loads); a
    stream's parse is kept on its job, so each input file is read once."""
    for job in jobs:
        if job.status != "todo":
            continue
        if kind == "compress":
            job.error = check_image(job.source) or ""
        else:
            try:
                job.stream = read_stream(job.source)
            except (OSError, BitstreamError) as e:
                job.error = str(e)
        if job.error:
            job.status = "failed"


# ------------------------------------------------------------------------------------------ runs
def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not sys.stderr.isatty())


def _finish(job: Job, manifest: Manifest, bar, report: Callable[[Job], None] | None) -> None:
    manifest.add(job)
    bar.update(1)
    if report:
        report(job)


def compress(jobs: list[Job], model_source: str | None, out_dir: Path, *, shard_of: tuple[int, int] = (0, 1),
             encode_kwargs: dict, drop_alpha: bool = False, device: str = "auto", redo: bool = False,
             report: Callable[[Job], None] | None = None) -> Summary:
    """Compress every job's image to its `.diffo` output (see the module docstring). Resuming compares the
    model, not the settings: `redo` (the CLI's --force) recompresses everything, e.g. at another bpp."""
    manifest = Manifest(manifest_path(out_dir, *shard_of))
    precheck(jobs, "compress")
    bound_heap()
    with _progress(len(jobs), "compress") as bar:
        for job in jobs:
            if job.status == "failed":
                _finish(job, manifest, bar, report)
        todo, earlier = [], []
        for job in jobs:
            if job.status == "todo":
                job.stream = None if redo else earlier_stream(job.output)
                (todo if job.stream is None else earlier).append(job)
        if not todo and not earlier:
            return Summary(jobs)
        from . import pipeline
        from .fileio import write_atomic
        from .hub import load_model
        from .image import load_image

        model = load_model(model_source, device=resolve_device(device))
        for job in earlier:
            if job.stream.fingerprint == model.fingerprint:
                job.status = "skipped"
                _describe_stream(job, job.stream)
                _finish(job, manifest, bar, report)
            else:
                todo.append(job)  # made by another model: redo
        todo.sort(key=lambda j: str(j.source))
        # One image in memory at a time: reading the next file ahead saved ~1.5 % of the time on Kodak but held a
        # second decoded image, above the peak of the largest image alone (bench part `collection`).
        for job in todo:
            t0 = time.perf_counter()
            image = data = None
            try:
                image = load_image(job.source, drop_alpha=drop_alpha)
            except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
                job.error = _why(e)
            if image is not None:
                try:
                    data = pipeline.encode(model, image, **encode_kwargs)
                    write_atomic(job.output, data, force=True)  # an earlier output is redone, not kept
                    _describe_stream(job, pipeline.read_header(data))
                except Exception as e:  # noqa: BLE001 - e.g. out of memory on one huge image
                    job.error = _why(e)
            job.status = "failed" if job.error else "done"
            job.seconds = round(time.perf_counter() - t0, 3)
            image = data = None
            release_memory()
            _finish(job, manifest, bar, report)
    return Summary(jobs)


def _glibc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


def bound_heap() -> None:
    """Before a folder: keep glibc's mmap threshold fixed at its 128 KiB default. glibc raises it after freeing a
    large block, so later large tensors came from the heap, which fragments across images: a folder's peak crept
    above one image's (bench part `collection`; same speed)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def release_memory() -> None:
    """Between images: collect cycles and hand freed heap back to the OS."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _why(e: Exception) -> str:
    """A file's error for the summary and manifest: our own errors say it all; others get their type."""
    return str(e) if isinstance(e, (DiffoError, OSError, ValueError)) else f"{type(e).__name__}: {e}"


def resolve_device(device: str) -> str:
    """'auto': the GPU of this process's LOCAL_RANK (set by torchrun / accelerate launch) when there is one."""
    if device != "auto":
        return device
    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"


def _describe_stream(job: Job, bs: Bitstream) -> None:
    job.bytes = bs.total_bytes
    job.bpp = bits_per_pixel(bs.total_bytes, bs.width, bs.height)
    job.rate, job.fingerprint = round(bs.rate, 6), bs.fingerprint.hex()


def decompress(jobs: list[Job], model_source: str | None, out_dir: Path, *, shard_of: tuple[int, int] = (0, 1),
               decode_kwargs: dict, device: str = "auto", redo: bool = False,
               report: Callable[[Job], None] | None = None) -> Summary:
    """Decode every job's `.diffo` file to its PNG output (see the module docstring); `redo` decodes all."""
    manifest = Manifest(manifest_path(out_dir, *shard_of))
    precheck(jobs, "decompress")
    bound_heap()
    with _progress(len(jobs), "decompress") as bar:
        todo = []
        for job in jobs:
            if job.stream is not None:
                _describe_stream(job, job.stream)
            if job.status == "todo" and not redo and image_done(job.output):
                job.status = "skipped"
            if job.status == "todo":
                todo.append(job)
            else:
                _finish(job, manifest, bar, report)
        if not todo:
            return Summary(jobs)
        from . import pipeline
        from .fileio import save_image_atomic
        from .hub import load_model

        model = load_model(model_source, device=resolve_device(device))
        ready = []
        for job in todo:  # every foreign stream reported before the first decode
            fp = job.stream.fingerprint
            if fp != model.fingerprint:
                job.status, job.error = "failed", (f"made by model {fp.hex()}, not by the loaded "
                                                   f"'{model.config.name}' ({model.fingerprint.hex()})")
                _finish(job, manifest, bar, report)
            else:
                ready.append(job)
        for job in ready:
            t0 = time.perf_counter()
            try:
                img = pipeline.decode(model, job.stream, **decode_kwargs)
                save_image_atomic(job.output, img, force=True)
            except Exception as e:  # noqa: BLE001 - one bad file never stops the batch
                job.error = _why(e)
            job.status = "failed" if job.error else "done"
            job.seconds = round(time.perf_counter() - t0, 3)
            img = None
            release_memory()
            _finish(job, manifest, bar, report)
    return Summary(jobs)
