"""`python -m diffo fuzz --n N`: hostile and damaged `.diffo` files against the whole decoder.

Seeds are real streams (small images coded at several rate levels with the model). Each case applies one
mutation — bit flips, byte overwrites, inserted or deleted bytes, truncation, a splice of two streams, a
forged header field, a forged length table — and, for half of the cases, recomputes the CRC so that the
damage reaches the parser, the entropy decoder and the networks instead of stopping at the checksum. Every
case is decoded with `pipeline.decode` (with a pixel budget: decoding time grows with the size a header
claims). A case passes when it decodes or raises one of the project's own errors (`DiffoError`); any other
exception is a crash. The report gives cases, outcomes, crashes (with their bytes, hex), the slowest case and
the peak memory of the process.
"""

from __future__ import annotations

import random
import resource
import struct
import time
import traceback
import zlib
from collections import Counter
from typing import Callable

import torch

from .. import pipeline
from ..bitstream import CRC_BYTES, HEADER_BYTES
from ..errors import DiffoError

SEED_SIZES = ((16, 16), (40, 56), (64, 96), (96, 128))
SEED_RATES = (0.0, 0.3, 1.0)
# Above the largest seed (96x128), so every seed decodes; a forged size can claim at most this much work.
DEFAULT_MAX_PIXELS = 128 * 128


def seed_streams(model) -> list[bytes]:
    """Real streams: smooth random images of a few sizes at a few rate levels (deterministic)."""
    g = torch.Generator().manual_seed(0)
    streams = []
    for h, w in SEED_SIZES:
        low = torch.rand(1, 3, max(1, h // 8), max(1, w // 8), generator=g)
        img = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        for r in SEED_RATES:
            streams.append(pipeline.encode(model, img, rate=r, seed=len(streams)))
    return streams


def fix_crc(data: bytes) -> bytes:
    """The same bytes with a CRC that matches them (so the damage is not caught by the checksum)."""
    if len(data) < CRC_BYTES + 1:
        return data
    body = data[:-CRC_BYTES]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


# ------------------------------------------------------------------------------------------------ mutators
def _flip_bits(r: random.Random, d: bytearray, _) -> bytearray:
    for _ in range(r.randint(1, 8)):
        i = r.randrange(len(d))
        d[i] ^= 1 << r.randrange(8)
    return d


def _overwrite(r, d, _):
    for _ in range(r.randint(1, 4)):
        d[r.randrange(len(d))] = r.randrange(256)
    return d


def _insert(r, d, _):
    i = r.randrange(len(d) + 1)
    return d[:i] + bytearray(r.randrange(256) for _ in range(r.randint(1, 16))) + d[i:]


def _delete(r, d, _):
    i = r.randrange(len(d))
    return d[:i] + d[i + r.randint(1, 16):]


def _truncate(r, d, _):
    return d[:r.randrange(len(d))]


def _splice(r, d, other):
    return d[:r.randrange(len(d) + 1)] + other[r.randrange(len(other) + 1):]


# header fields: (offset, size) in the fixed header (see bitstream.py)
_FIELDS = {"version": (4, 1), "flags": (5, 1), "fingerprint": (6, 8), "width": (14, 2), "height": (16, 2),
           "rate": (18, 2), "strength": (20, 2), "seed": (22, 4), "count": (26, 1)}


def _forge_field(r, d, _):
    off, size = _FIELDS[r.choice(sorted(_FIELDS))]
    if len(d) >= off + size:
        value = r.choice([0, 1, 2, (1 << (8 * size)) - 1, r.randrange(1 << (8 * size))])
        d[off:off + size] = value.to_bytes(size, "little")
    return d


def _forge_lengths(r, d, _):
    # the LEB128 length table right after the fixed header: rewrite one of its bytes
    if len(d) > HEADER_BYTES:
        i = HEADER_BYTES + r.randrange(min(6, len(d) - HEADER_BYTES))
        d[i] = r.choice([0x00, 0x7F, 0x80, 0xFF, r.randrange(256)])
    return d


MUTATORS: dict[str, Callable] = {
    "flip_bits": _flip_bits, "overwrite": _overwrite, "insert": _insert, "delete": _delete,
    "truncate": _truncate, "splice": _splice, "forge_field": _forge_field, "forge_lengths": _forge_lengths,
}


def mutate(r: random.Random, seeds: list[bytes]) -> tuple[str, bool, bytes]:
    """(mutator name, CRC fixed?, mutated bytes) for one case."""
    name = r.choice(sorted(MUTATORS))
    data = MUTATORS[name](r, bytearray(r.choice(seeds)), r.choice(seeds))
    fixed = r.random() < 0.5
    return name, fixed, fix_crc(bytes(data)) if fixed else bytes(data)


# ------------------------------------------------------------------------------------------------ run
def run(model, n: int, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, progress=None) -> dict:
    seeds = seed_streams(model)
    r = random.Random(seed)
    outcomes: Counter = Counter()
    by_mutator: Counter = Counter()
    crashes = []
    slowest = (0.0, "")
    times = []
    t_all = time.perf_counter()
    for case in range(n):
        name, fixed, data = mutate(r, seeds)
        t0 = time.perf_counter()
        try:
            pipeline.decode(model, data, max_pixels=max_pixels)
            outcome = "decoded"
        except DiffoError as e:
            outcome = type(e).__name__
        except Exception as e:  # anything else is a crash: the decoder let a foreign error escape
            outcome = "CRASH"
            crashes.append({"case": case, "mutator": name, "crc_fixed": fixed, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc(limit=4), "data_hex": data.hex()})
        dt = time.perf_counter() - t0
        times.append(dt)
        if dt > slowest[0]:
            slowest = (dt, f"case {case}: {name}{' + CRC fixed' if fixed else ''} -> {outcome}")
        outcomes[outcome] += 1
        by_mutator[f"{name}{'+crc' if fixed else ''}"] += 1
        if progress:
            progress()
    return {"cases": n, "seed": seed, "max_pixels": max_pixels, "seed_streams": len(seeds),
            "outcomes": dict(outcomes.most_common()), "mutators": dict(sorted(by_mutator.items())),
            "crashes": len(crashes), "crash_cases": crashes[:20],
            "slowest_s": round(slowest[0], 4), "slowest_case": slowest[1],
            "p99_s": round(sorted(times)[int(0.99 * (len(times) - 1))], 4) if times else 0.0,
            "over_1s": sum(t >= 1.0 for t in times),
            "total_s": round(time.perf_counter() - t_all, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
