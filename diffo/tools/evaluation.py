"""`python -m diffo eval`: rate-distortion of DiffO against classical codecs on a folder of images.

For every image × codec × target bpp one *point*: the codec's file at the target (DiffO: its target-bpp mode;
`diffo-nodenoise`: the same DiffO stream decoded without the diffusion step; classical codecs: the best quality
whose real file fits, see classical.py), its real size and its metrics. Each point is cached as JSON under
OUT/points/, so an interrupted run resumes where it stopped. Outputs:

    OUT/results.csv       one row per image × codec × target (unreachable targets: a row with a note, no figures)
    OUT/summary.md        means per codec and target, BD-rates of DiffO against AVIF, what was not measured
    OUT/rd_<metric>.png   RD curves of the per-target means, one plot per metric
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import classical
from .. import pipeline
from ..bitstream import bits_per_pixel
from ..collection import IMAGE_SUFFIXES
from ..fileio import save_image_atomic, write_atomic
from ..extras import require
from ..image import load_image
from .metrics import LEARNED, LOWER_IS_BETTER, METRICS, MetricUnavailable, learned_metric

DIFFO_CODECS = ["diffo", "diffo-nodenoise"]
ALL_CODECS = DIFFO_CODECS + list(classical.CODECS)
DEFAULT_BPPS = (0.02, 0.05, 0.1, 0.15)
BASE_METRICS = list(METRICS)  # psnr, ms_ssim, haarpsi, gmsd, niqe (no-reference: of the reconstruction)
PANEL_CODECS = ("diffo", "diffo-nodenoise", "avif", "vvc")  # realism is judged by looking: these side by side
PANEL_CROP, PANEL_ZOOM = 128, 2  # the crop panels' region (px of the original) and nearest-neighbour zoom


def list_images(folder: Path) -> list[Path]:
    images = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images in {folder}")
    return images


def parse_codecs(text: str | None) -> list[str]:
    """'diffo,avif' → names, checked; None → every codec whose library is installed."""
    if not text:
        return DIFFO_CODECS + classical.available_codecs()
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in ALL_CODECS]
    if unknown:
        raise ValueError(f"unknown codec(s) {unknown}; known: {', '.join(ALL_CODECS)}")
    for c in names:
        if c not in DIFFO_CODECS:
            classical.codec(c)  # raises CodecUnavailable naming the package
    return names


@dataclass
class Evaluation:
    images: list[Path]
    bpps: list[float]
    codecs: list[str]
    out: Path
    model_source: str | None = None
    metrics: list[str] = field(default_factory=lambda: list(BASE_METRICS))
    unavailable: dict[str, str] = field(default_factory=dict)  # metric → why it was not measured
    save_images: bool = False
    fingerprint: str = ""  # the DiffO model's: its points are cached per model, never reused for another

    def _name(self, codec: str, bpp: float) -> str:
        return f"{codec}@{bpp:g}" + (f".{self.fingerprint}" if codec in DIFFO_CODECS else "")

    def image_path(self, image: Path, codec: str, bpp: float) -> Path:
        """Where a reconstruction is kept (every one with --save-images, the panel codecs' always)."""
        return self.out / "images" / image.stem / f"{self._name(codec, bpp)}.png"

    def point_path(self, image: Path, codec: str, bpp: float, suffix: str = ".json") -> Path:
        return self.out / "points" / image.stem / f"{self._name(codec, bpp)}{suffix}"


def _measure(original: torch.Tensor, rec: torch.Tensor, measures: dict) -> dict[str, float]:
    return {name: fn(original, rec) for name, fn in measures.items()}


def evaluate_image(ev: Evaluation, image: Path, model, measures: dict, progress=None) -> list[dict]:
    """Every (codec, target) point of one image, from the cache where present."""
    original = None
    rows = []
    for bpp in ev.bpps:
        for codec in ev.codecs:
            path = ev.point_path(image, codec, bpp)
            if path.is_file():
                row = json.loads(path.read_text())
            else:
                if original is None:
                    original = load_image(image)
                row = _point(ev, image, original, codec, bpp, model, measures)
                write_atomic(path, json.dumps(row, indent=1).encode(), force=True)
            rows.append(row)
            if progress:
                progress()
    write_panels(ev, image, rows)
    return rows


def texture_window(img: torch.Tensor, size: int = PANEL_CROP) -> tuple[int, int]:
    """(top, left) of the size x size window with the most local detail (mean absolute Laplacian of the
    luminance): where blur and invented texture show. The same for every codec of an image."""
    lum = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None, None]
    lap = torch.nn.functional.conv2d(lum, torch.tensor([[[[0., 1, 0], [1, -4, 1], [0, 1, 0]]]]), padding=1).abs()
    size = min(size, img.shape[1], img.shape[2])
    score = torch.nn.functional.avg_pool2d(lap, size, stride=max(1, size // 4))[0, 0]
    i = int(score.argmax())
    return (i // score.shape[1]) * max(1, size // 4), (i % score.shape[1]) * max(1, size // 4)


def write_panels(ev: Evaluation, image: Path, rows: list[dict]) -> list[Path]:
    """Per target bpp: the same crop of the original and of each panel codec's reconstruction, zoomed, each
    labelled with its real bpp, PSNR and NIQE (of the whole image). Codecs that missed the target are left out."""
    from .figures import comparison_picture

    if not set(PANEL_CODECS) & set(ev.codecs):
        return []
    original = load_image(image)
    top, left = texture_window(original)
    size = min(PANEL_CROP, original.shape[1], original.shape[2])

    def crop(img: torch.Tensor) -> torch.Tensor:
        c = img[:, top:top + size, left:left + size]
        return c.repeat_interleave(PANEL_ZOOM, 1).repeat_interleave(PANEL_ZOOM, 2)

    written = []
    niqe_original = METRICS["niqe"](original, original)
    for bpp in ev.bpps:
        tiles = []
        for codec in PANEL_CODECS:
            row = next((r for r in rows if r["codec"] == codec and r["target_bpp"] == bpp and "note" not in r), None)
            path = ev.image_path(image, codec, bpp)
            if row is None or not path.is_file():
                continue
            label = (f"{codec}\n{row['bpp']:.4f} bpp, PSNR {_label(row.get('psnr'), '{:.2f} dB')}\n"
                     f"NIQE {_label(row.get('niqe'), '{:.2f}')}")
            tiles.append((label, crop(load_image(path))))
        if not tiles:
            continue
        sheet = comparison_picture(crop(original), tiles, original_label=(
            f"original ({image.name})\ncrop {size}x{size} at ({left}, {top}), x{PANEL_ZOOM}\n"
            f"NIQE {_label(niqe_original, '{:.2f}')}"))
        written.append(save_image_atomic(ev.out / "panels" / f"{image.stem}@{bpp:g}.png", sheet, force=True))
    return written


def _label(value, pattern: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else pattern.format(value)


def _point(ev: Evaluation, image: Path, original: torch.Tensor, codec: str, bpp: float, model, measures) -> dict:
    h, w = original.shape[1:]
    row = {"image": image.name, "codec": codec, "target_bpp": bpp}
    t0 = time.perf_counter()
    if codec in DIFFO_CODECS:
        stream_path = ev.point_path(image, "diffo", bpp, ".diffo")
        if stream_path.is_file():  # diffo and diffo-nodenoise decode the same stream
            data = stream_path.read_bytes()
        else:
            data = pipeline.encode(model, original, bpp=bpp)
            write_atomic(stream_path, data, force=True)
        rec = pipeline.decode(model, data, denoise=codec == "diffo")
        n_bytes = len(data)
    else:
        try:
            res = classical.encode_to_bpp(original, codec, bpp)
        except classical.TargetUnreachable as e:
            return {**row, "note": str(e)}
        rec, n_bytes = res.image, len(res.data)
    row.update(bpp=bits_per_pixel(n_bytes, w, h), bytes=n_bytes, seconds=round(time.perf_counter() - t0, 3))
    row.update(_measure(original, rec, measures))
    if ev.save_images or codec in PANEL_CODECS:
        save_image_atomic(ev.image_path(image, codec, bpp), rec, force=True)
    return row


def run(ev: Evaluation, write: bool = True) -> list[dict]:
    """Every point of every image (cached per point, so a run resumes, and sharded workers share one cache);
    with `write`, the CSV, summary and plots of them."""
    from tqdm import tqdm

    from ..hub import load_model

    measures = {m: METRICS[m] for m in ev.metrics if m in METRICS}
    for name in LEARNED:
        try:
            measures[name] = learned_metric(name)
        except MetricUnavailable as e:
            ev.unavailable[name] = str(e)
        else:
            if name not in ev.metrics:
                ev.metrics.append(name)
    model = load_model(ev.model_source) if set(ev.codecs) & set(DIFFO_CODECS) else None
    if model is not None:
        ev.fingerprint = model.fingerprint.hex()
    rows: list[dict] = []
    total = len(ev.images) * len(ev.bpps) * len(ev.codecs)
    with tqdm(total=total, desc="eval", unit="point") as bar:
        for image in ev.images:
            bar.set_postfix_str(image.name)
            rows += evaluate_image(ev, image, model, measures, bar.update)
    if write:
        write_outputs(ev, rows)
    return rows


# ------------------------------------------------------------------------------------------------ outputs
def write_outputs(ev: Evaluation, rows: list[dict]) -> None:
    columns = ["image", "codec", "target_bpp", "bpp", "bytes", *ev.metrics, "seconds", "note"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c, "")) for c in columns])
    write_atomic(ev.out / "results.csv", buf.getvalue().encode(), force=True)
    means = mean_points(rows, ev.metrics, len(ev.images))
    write_atomic(ev.out / "summary.md", summary_markdown(ev, means).encode(), force=True)
    from .figures import rd_plot

    for metric in ev.metrics:
        series = {c: [(p["bpp"], p[metric]) for p in pts if p["complete"]] for c, pts in means.items()}
        partial = {c: [(p["bpp"], p[metric]) for p in pts if not p["complete"] and p["reached"]]
                   for c, pts in means.items()}
        plot = rd_plot(series, metric, f"{metric}, mean of {len(ev.images)} images per target",
                       higher_is_better=metric not in LOWER_IS_BETTER, partial=partial)
        save_image_atomic(ev.out / f"rd_{metric}.png", plot, force=True)


def _cell(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"  # empty = not measured (e.g. MS-SSIM on a tiny image)
    return v


def mean_points(rows: list[dict], metrics: list[str], n_images: int) -> dict[str, list[dict]]:
    """codec → per target: mean bpp and metrics over the images that reached it, and how many did."""
    out: dict[str, list[dict]] = {}
    by_key: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["codec"], row["target_bpp"]), []).append(row)
    for (codec, target), group in by_key.items():
        reached = [r for r in group if "note" not in r]
        point = {"target_bpp": target, "reached": len(reached), "of": len(group),
                 "complete": bool(reached) and len(reached) == len(group) == n_images}
        for key in ["bpp", *metrics]:
            vals = [r[key] for r in reached if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            point[key] = float(np.mean(vals)) if vals else math.nan
        out.setdefault(codec, []).append(point)
    for pts in out.values():
        pts.sort(key=lambda p: p["target_bpp"])
    return out


def bd_rate(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """Bjøntegaard delta rate (%) of `test` against `anchor`, points (bpp, quality): the mean difference of
    log-rate over the overlapping quality interval, with monotone cubic (PCHIP) interpolation as in
    current practice (Bjøntegaard 2001 / VCEG-AL22 with PCHIP). None when the quality ranges do not overlap
    or a curve has fewer than 2 points or is not monotone."""
    require("scipy", "BD-rate")
    from scipy.integrate import trapezoid
    from scipy.interpolate import PchipInterpolator

    def curve(points):
        pts = sorted(points, key=lambda p: p[1])
        q = np.array([p[1] for p in pts])
        r = np.log(np.array([p[0] for p in pts]))
        if len(pts) < 2 or np.any(np.diff(q) <= 0):
            return None
        return q, PchipInterpolator(q, r)

    a, t = curve(anchor), curve(test)
    if a is None or t is None:
        return None
    lo, hi = max(a[0][0], t[0][0]), min(a[0][-1], t[0][-1])
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, 200)
    diff = float(trapezoid(t[1](grid) - a[1](grid), grid) / (hi - lo))
    return (math.exp(diff) - 1) * 100


def _fmt(v: float, metric: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    return f"{v:.2f}" if metric == "psnr" else f"{v:.4f}"


def _no_bd_reason(anchor, test, metric: str, sign: int) -> str:
    if len(anchor) < 2 or len(test) < 2:
        return "n/a (fewer than 2 complete targets)"
    for name, pts in (("AVIF", anchor), ("this codec", test)):
        qs = [q for _, q in sorted(pts)]
        if any(b <= a for a, b in zip(qs, qs[1:])):
            return f"n/a ({name}'s {metric} does not rise with rate)"
    rng = lambda pts: f"{_fmt(min(sign * q for _, q in pts), metric)}–{_fmt(max(sign * q for _, q in pts), metric)}"  # noqa: E731
    return f"n/a (no overlap: {rng(test)} vs AVIF {rng(anchor)})"


def summary_markdown(ev: Evaluation, means: dict[str, list[dict]]) -> str:
    lines = [f"# DiffO rate-distortion: {len(ev.images)} images, targets {', '.join(f'{b:g}' for b in ev.bpps)} bpp",
             "", "Means over the images that reached each target (a codec that cannot make a file that small for "
             "an image is counted in `reached`, not averaged).", ""]
    if ev.fingerprint:
        lines[1:1] = ["", f"DiffO model fingerprint `{ev.fingerprint}`."]
    header = ["codec", "target bpp", "reached", "bpp", *ev.metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for codec in ev.codecs:
        for p in means.get(codec, []):
            cells = [codec, f"{p['target_bpp']:g}", f"{p['reached']}/{p['of']}", _fmt(p["bpp"], "bpp"),
                     *(_fmt(p[m], m) for m in ev.metrics)]
            lines.append("| " + " | ".join(cells) + " |")
    if "avif" in means:
        lines += ["", "## BD-rate against AVIF (negative: fewer bits for the same quality)", "",
                  "| codec | " + " | ".join(ev.metrics) + " |", "|" + "---|" * (len(ev.metrics) + 1)]
        for codec in [c for c in ev.codecs if c != "avif"]:
            cells = []
            for m in ev.metrics:
                sign = -1 if m in LOWER_IS_BETTER else 1  # BD integrates over rising quality
                anchor = [(p["bpp"], sign * p[m]) for p in means.get("avif", []) if p["complete"]]
                test = [(p["bpp"], sign * p[m]) for p in means.get(codec, []) if p["complete"]]
                v = bd_rate(anchor, test)
                cells.append(f"{v:+.1f} %" if v is not None else _no_bd_reason(anchor, test, m, sign))
            lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    if ev.unavailable:
        lines += ["", "## Not measured", ""] + [f"- {why}" for why in ev.unavailable.values()]
    return "\n".join(lines) + "\n"
