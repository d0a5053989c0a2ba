"""Training photos: loaded once into memory, served as random multi-scale crops with flips."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(dirs: list[str | Path]) -> list[Path]:
    """Every image under `dirs` (recursively), sorted. Refuses evaluation data (Kodak)."""
    files = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"training data folder not found: {d}")
        if any(part.lower() == "kodak" for part in d.resolve().parts):
            raise ValueError(f"{d} looks like the Kodak evaluation set: never train on it")
        files += [p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images found under {', '.join(map(str, dirs))}")
    return sorted(files)


def split_holdout(files: list[Path], fraction: float = 0.04) -> tuple[list[Path], list[Path]]:
    """Deterministic held-out slice chosen by file-name hash (stable when files are added)."""
    def bucket(p: Path) -> float:
        return int(hashlib.sha1(p.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    held = [p for p in files if bucket(p) < fraction]
    return [p for p in files if bucket(p) >= fraction], held


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)  # uint8 [3,H,W]


class CropSampler:
    """Random crops of `size` from in-memory photos; large photos are first downscaled by a random factor
    (multi-scale: a crop then shows a wider view), and crops are flipped at random."""

    def __init__(self, files: list[Path], size: int, seed: int = 0):
        self.images = [load_rgb(p) for p in files]
        self.size = size
        self.rng = random.Random(seed)

    def crop(self) -> torch.Tensor:
        img = self.images[self.rng.randrange(len(self.images))]
        h, w = img.shape[1:]
        short = min(h, w)
        if short >= 2 * self.size and self.rng.random() < 0.5:
            scale = self.rng.uniform(self.size / short * 1.05, 1.0)
            img = torch.nn.functional.interpolate(img[None].float(), scale_factor=scale, mode="area",
                                                  recompute_scale_factor=False)[0].round().clamp(0, 255).byte()
            h, w = img.shape[1:]
        s = min(self.size, h, w)
        top, left = self.rng.randrange(h - s + 1), self.rng.randrange(w - s + 1)
        c = img[:, top:top + s, left:left + s]
        if s < self.size:
            c = torch.nn.functional.interpolate(c[None].float(), size=(self.size, self.size), mode="bilinear")[0]
        if self.rng.random() < 0.5:
            c = c.flip(-1)
        return c.float() / 255

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.crop() for _ in range(n)])


class LatentCropSampler:
    """Random crops of cached latents (with horizontal flips) for the latent-space stages."""

    def __init__(self, latents: list[torch.Tensor], size: int, seed: int = 0):
        self.latents = [z for z in latents if min(z.shape[-2:]) >= size]
        if not self.latents:
            raise ValueError(f"no cached latent is at least {size}x{size}")
        self.size = size
        self.rng = random.Random(seed)

    def batch(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            z = self.latents[self.rng.randrange(len(self.latents))]
            h, w = z.shape[-2:]
            top, left = self.rng.randrange(h - self.size + 1), self.rng.randrange(w - self.size + 1)
            c = z[:, top:top + self.size, left:left + self.size]
            out.append(c.flip(-1) if self.rng.random() < 0.5 else c)
        return torch.stack(out)


def load_centre_crop(path: Path, size: int) -> torch.Tensor:
    """The centre size x size crop (smaller sides kept whole) of a photo as [3, h, w] float in [0, 1]: what the
    held-out measurements and the noise tuning decode."""
    img = load_rgb(path).float() / 255
    h, w = img.shape[1:]
    s = min(size, h, w)
    return img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
