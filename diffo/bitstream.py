"""The `.diffo` container, format versions 1 and 2: pure Python, no torch.

A `.diffo` file is a fixed 27-byte header, a table of sub-stream lengths, the sub-streams, and a
CRC-32 trailer. All integers are little-endian::

    off  size  field
      0     4  magic b"DIFO"
      4     1  format version (uint8): 1, 2 or 3 (see below)
      5     1  flags (uint8): bit0 = residual present; format 3: bits 4-7 = model family (0 DiffO, 1 OSDiff);
               any other bit is an error
      6     8  model fingerprint (8 raw bytes)
     14     2  width  (uint16, 1..65535)
     16     2  height (uint16, 1..65535)
     18     2  rate level, q/65535 (uint16)
     20     2  decode noise strength, q/65535 (uint16)
     22     4  noise seed (uint32)
     26     1  number of sub-streams n (DiffO: 1 without residual, 3 with; OSDiff: 2)
     27   var  n lengths, unsigned LEB128 varints (1..4 bytes each, minimally encoded)
    ...   sum  the sub-streams: DiffO: base indices, then (with residual) hyper z, then residual y;
               OSDiff: hyper z, then y (all ten slices, in the decoder's order)
  end-4     4  CRC-32 (zlib.crc32) of every byte before it

The versions share this layout. Format 1: CompressAI's rANS coder (still read where CompressAI is installed);
format 2: constriction's range coder (what DiffO models write); format 3: the same range coder, a sub-stream
may hold several chunks coded one after the other (autoregressive models), and the flags name the model
family (what OSDiff models write; DiffO streams stay format 2, so older readers still read them).
`Bitstream.from_bytes` raises only `BitstreamError` (or its subclass `UnsupportedVersionError`) on bad
input, never IndexError/struct.error; a non-bytes argument is a TypeError. The full specification,
with the validation rules and the versioning policy, is in docs/bitstream.md.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from dataclasses import dataclass

from .errors import BitstreamError, UnsupportedVersionError

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "MAGIC",
    "FINGERPRINT_BYTES",
    "MAX_SIDE",
    "MAX_PIXELS",
    "HEADER_BYTES",
    "CRC_BYTES",
    "MAX_VARINT_BYTES",
    "MAX_STREAM_BYTES",
    "FLAG_RESIDUAL",
    "FAMILY_NAMES",
    "quantize_unit",
    "dequantize_unit",
    "bits_per_pixel",
    "Bitstream",
    "peek_header",
]

FORMAT_VERSION = 2  # what DiffO models write (each family writes its own: `CodecBase.format_version`)
READ_VERSIONS = (1, 2, 3)  # 1 = CompressAI rANS sub-streams, 2 = constriction range coder, 3 = 2 + chunks + family
FAMILY_NAMES = {0: "DiffO", 1: "OSDiff"}  # the family field of format 3 (formats 1 and 2 are DiffO)
_FAMILY_STREAMS = {0: (1, 3), 1: (2,)}  # sub-stream counts each family writes
MAGIC = b"DIFO"
FINGERPRINT_BYTES = 8
MAX_SIDE = 65535
MAX_PIXELS = 1 << 28

HEADER_BYTES = 27  # fixed part, up to and including the sub-stream count
CRC_BYTES = 4
MAX_VARINT_BYTES = 4
MAX_STREAM_BYTES = (1 << (7 * MAX_VARINT_BYTES)) - 1  # largest length a 4-byte varint holds
FLAG_RESIDUAL = 0x01
_KNOWN_FLAGS = FLAG_RESIDUAL
_FAMILY_SHIFT = 4
_Q_MAX = 65535
_SEED_MAX = 2**32 - 1

# magic, version, flags, fingerprint, width, height, rate_q, strength_q, seed, n_streams
_HEADER = struct.Struct("<4sBB8sHHHHIB")
assert _HEADER.size == HEADER_BYTES


def quantize_unit(x: float) -> int:
    """Map a float in [0, 1] to a uint16 q = round(x * 65535). NaN, inf, or out of range -> ValueError."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise ValueError(f"expected a number in [0, 1], got {x!r}") from None
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"value {x!r} is not a finite number in [0, 1]")
    return int(round(float(x) * _Q_MAX))


def dequantize_unit(q: int) -> float:
    """Inverse of `quantize_unit`: q / 65535."""
    return q / _Q_MAX


def bits_per_pixel(n_bytes: int, width: int, height: int) -> float:
    """8 * n_bytes / (width * height): the rate of a whole `.diffo` file, header included."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    return 8.0 * n_bytes / (width * height)


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _decode_varint(body: bytes, pos: int, index: int) -> tuple[int, int]:
    """Read the varint for sub-stream `index` from body[pos:]; return (value, new pos)."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(body):
            raise BitstreamError(
                f"truncated .diffo stream: the length of sub-stream {index} ends at byte {len(body)}, "
                "before the length table is complete"
            )
        b = body[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if b == 0 and i > 0:
                raise BitstreamError(
                    f"the length of sub-stream {index} is not minimally encoded (overlong varint at byte {pos})"
                )
            return value, pos + i + 1
    raise BitstreamError(
        f"the length of sub-stream {index} is an overlong varint at byte {pos} "
        f"(more than {MAX_VARINT_BYTES} bytes)"
    )


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitstreamError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BitstreamError(f"{name} {value} is out of range {lo}..{hi}")


def _check_stream_count(family: int, n: int) -> None:
    if n not in _FAMILY_STREAMS[family]:
        what = {0: "1 sub-stream (base) or 3 (base, z, y)", 1: "2 sub-streams (z, y)"}[family]
        raise BitstreamError(f"a {FAMILY_NAMES[family]} stream holds {what}, got {n}")


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise BitstreamError(
            f"image size {width}x{height} ({width * height} pixels) exceeds the limit of {MAX_PIXELS} pixels"
        )


@dataclass(frozen=True)
class Bitstream:
    """One `.diffo` file: header fields plus the entropy-coded sub-streams."""

    fingerprint: bytes  # exactly FINGERPRINT_BYTES raw bytes
    width: int
    height: int
    rate_q: int  # 0..65535, rate = rate_q / 65535
    strength_q: int  # 0..65535, strength = strength_q / 65535
    seed: int  # 0..2**32-1
    streams: tuple[bytes, ...]  # (base,) or (base, z, y)
    format_version: int = FORMAT_VERSION  # names the sub-streams' entropy coder (see module docstring)
    family: int = 0  # FAMILY_NAMES; anything but 0 needs format 3

    def __post_init__(self) -> None:
        # Normalise bytes-likes so equality and hashing work; validation happens in to_bytes().
        if isinstance(self.fingerprint, (bytearray, memoryview)):
            object.__setattr__(self, "fingerprint", bytes(self.fingerprint))
        if isinstance(self.streams, (list, tuple)) and all(
            isinstance(s, (bytes, bytearray, memoryview)) for s in self.streams
        ):
            object.__setattr__(self, "streams", tuple(bytes(s) for s in self.streams))

    @property
    def rate(self) -> float:
        return dequantize_unit(self.rate_q)

    @property
    def strength(self) -> float:
        return dequantize_unit(self.strength_q)

    @property
    def has_residual(self) -> bool:
        return self.family == 0 and len(self.streams) == 3

    def validate(self) -> None:
        """Raise BitstreamError (a ValueError) naming the first field that cannot be written."""
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_BYTES:
            raise BitstreamError(
                f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {self.fingerprint!r}"
            )
        _check_int("width", self.width, 1, MAX_SIDE)
        _check_int("height", self.height, 1, MAX_SIDE)
        _check_size(self.width, self.height)
        _check_int("rate_q", self.rate_q, 0, _Q_MAX)
        _check_int("strength_q", self.strength_q, 0, _Q_MAX)
        _check_int("seed", self.seed, 0, _SEED_MAX)
        if self.format_version not in READ_VERSIONS:
            raise BitstreamError(f"format_version must be one of {READ_VERSIONS}, got {self.format_version!r}")
        if self.family not in FAMILY_NAMES:
            raise BitstreamError(f"family must be one of {sorted(FAMILY_NAMES)}, got {self.family!r}")
        if self.family and self.format_version < 3:
            raise BitstreamError(f"format {self.format_version} carries DiffO streams only; "
                                 f"{FAMILY_NAMES[self.family]} needs format 3")
        if not isinstance(self.streams, tuple):
            raise BitstreamError(f"streams must be a tuple of bytes, got {type(self.streams).__name__}")
        _check_stream_count(self.family, len(self.streams))
        for i, s in enumerate(self.streams):
            if not isinstance(s, bytes):
                raise BitstreamError(f"sub-stream {i} must be bytes, got {type(s).__name__}")
            if len(s) > MAX_STREAM_BYTES:
                raise BitstreamError(
                    f"sub-stream {i} is {len(s)} bytes, more than the {MAX_STREAM_BYTES} a length field holds"
                )

    def to_bytes(self) -> bytes:
        self.validate()
        flags = (FLAG_RESIDUAL if self.has_residual else 0) | (self.family << _FAMILY_SHIFT)
        parts = [
            _HEADER.pack(
                MAGIC,
                self.format_version,
                flags,
                self.fingerprint,
                self.width,
                self.height,
                self.rate_q,
                self.strength_q,
                self.seed,
                len(self.streams),
            )
        ]
        parts.extend(_encode_varint(len(s)) for s in self.streams)
        parts.extend(self.streams)
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Bitstream":
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)
        n = len(data)

        # magic (a short file that is a prefix of the magic is truncated, anything else is not ours)
        if data[:4] != MAGIC:
            if n < len(MAGIC) and MAGIC.startswith(data):
                raise BitstreamError(
                    f"truncated .diffo stream: header needs {HEADER_BYTES} bytes, file has {n}"
                )
            raise BitstreamError(f"not a .diffo file (bad magic {data[:4]!r})")
        if n < 5:
            raise BitstreamError(f"truncated .diffo stream: header needs {HEADER_BYTES} bytes, file has {n}")

        version = data[4]
        if version > max(READ_VERSIONS):
            raise UnsupportedVersionError(
                f"this .diffo file was made by a newer version of DiffO (format {version}); "
                f"this one reads formats {', '.join(map(str, READ_VERSIONS))}: upgrade ComfyUI-DiffO"
            )
        if version == 0:
            raise BitstreamError("invalid .diffo format version 0")

        if n < HEADER_BYTES:
            raise BitstreamError(f"truncated .diffo stream: header needs {HEADER_BYTES} bytes, file has {n}")
        if n < HEADER_BYTES + CRC_BYTES:
            raise BitstreamError(
                f"truncated .diffo stream: header and checksum need {HEADER_BYTES + CRC_BYTES} bytes, "
                f"file has {n}"
            )

        body = data[:-CRC_BYTES]
        (stored,) = struct.unpack("<I", data[-CRC_BYTES:])
        computed = zlib.crc32(body) & 0xFFFFFFFF
        if stored != computed:
            raise BitstreamError(
                f"checksum mismatch: the file is damaged (stored 0x{stored:08x}, computed 0x{computed:08x})"
            )

        (_, _, flags, fingerprint, width, height, rate_q, strength_q, seed, n_streams) = _HEADER.unpack_from(
            body, 0
        )
        family = flags >> _FAMILY_SHIFT if version >= 3 else 0
        if version >= 3:
            flags &= (1 << _FAMILY_SHIFT) - 1
            if family not in FAMILY_NAMES:
                raise BitstreamError(f"unknown model family {family} in .diffo header (this version knows "
                                     f"{', '.join(f'{k} {v}' for k, v in FAMILY_NAMES.items())})")
        if flags & ~_KNOWN_FLAGS:
            raise BitstreamError(f"unknown flags 0x{flags:02x} in .diffo header")
        if width == 0 or height == 0:
            raise BitstreamError(f"invalid image size {width}x{height} in .diffo header: sides must be at least 1")
        _check_size(width, height)
        residual = bool(flags & FLAG_RESIDUAL)
        if family == 0:
            expected = 3 if residual else 1
            if n_streams != expected:
                raise BitstreamError(
                    f"sub-stream count {n_streams} does not match the flags "
                    f"(residual {'present' if residual else 'absent'} needs {expected})"
                )
        else:
            if residual:
                raise BitstreamError(f"the residual flag is set in an {FAMILY_NAMES[family]} stream")
            _check_stream_count(family, n_streams)

        pos = HEADER_BYTES
        lengths = []
        for i in range(n_streams):
            length, pos = _decode_varint(body, pos, i)
            lengths.append(length)
        available = len(body) - pos
        total = sum(lengths)
        if total > available:
            raise BitstreamError(
                f"sub-stream lengths ({', '.join(map(str, lengths))}; {total} bytes) exceed the file size "
                f"({available} bytes after the length table)"
            )
        if total < available:
            raise BitstreamError(
                f"trailing bytes after the last sub-stream: {available - total} bytes not covered by the "
                f"sub-stream lengths ({', '.join(map(str, lengths))})"
            )
        streams = []
        for length in lengths:
            streams.append(body[pos : pos + length])
            pos += length
        return cls(
            fingerprint=fingerprint,
            width=width,
            height=height,
            rate_q=rate_q,
            strength_q=strength_q,
            seed=seed,
            streams=tuple(streams),
            format_version=version,
            family=family,
        )

    @property
    def total_bytes(self) -> int:
        """Size of `to_bytes()` without serialising."""
        return (
            HEADER_BYTES
            + sum(_varint_size(len(s)) for s in self.streams)
            + sum(len(s) for s in self.streams)
            + CRC_BYTES
        )

    def header_dict(self) -> dict:
        """JSON-able summary of the header (fingerprint as hex, bpp over the whole file)."""
        total = self.total_bytes
        return {
            "format_version": self.format_version,
            "family": FAMILY_NAMES[self.family],
            "fingerprint": bytes(self.fingerprint).hex(),
            "width": self.width,
            "height": self.height,
            "rate": self.rate,
            "strength": self.strength,
            "seed": self.seed,
            "stream_bytes": [len(s) for s in self.streams],
            "total_bytes": total,
            "bpp": bits_per_pixel(total, self.width, self.height),
        }

    def replace(self, **changes) -> "Bitstream":
        return dataclasses.replace(self, **changes)


def peek_header(data: bytes) -> Bitstream:
    """Parse and validate a `.diffo` file (same as `Bitstream.from_bytes`)."""
    return Bitstream.from_bytes(data)
