"""Tests of the `.diffo` container (diffo/bitstream.py): round trips, every error path, fuzzing."""

from __future__ import annotations

import json
import math
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffo.bitstream import (
    FINGERPRINT_BYTES,
    FORMAT_VERSION,
    MAGIC,
    MAX_PIXELS,
    Bitstream,
    bits_per_pixel,
    dequantize_unit,
    peek_header,
    quantize_unit,
)
from diffo.errors import BitstreamError, DiffoError, UnsupportedVersionError

FP = bytes(range(1, 9))


def make(streams=(b"base",), **kw) -> Bitstream:
    fields = dict(fingerprint=FP, width=64, height=48, rate_q=1234, strength_q=40000, seed=7, streams=tuple(streams))
    fields.update(kw)
    return Bitstream(**fields)


def reseal(body: bytes) -> bytes:
    """Append a correct CRC, so a deliberately malformed body reaches the field checks."""
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def body_of(data: bytes) -> bytes:
    return data[:-4]


VALID = make().to_bytes()
VALID_RES = make((b"\x01\x02\x03", b"zz", b"y" * 300)).to_bytes()


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize(
    "bs",
    [
        make(),
        make((b"",)),
        make((b"", b"", b"")),
        make((b"a" * 127, b"b" * 128, b"c" * 16384)),
        make((bytes(range(256)) * 400,)),
        make(width=1, height=1, rate_q=0, strength_q=0, seed=0),
        make(width=65535, height=4096, rate_q=65535, strength_q=65535, seed=2**32 - 1, fingerprint=b"\xff" * 8),
        make(width=16384, height=16384),  # exactly MAX_PIXELS
    ],
)
def test_round_trip(bs):
    data = bs.to_bytes()
    back = Bitstream.from_bytes(data)
    assert back == bs
    assert peek_header(data) == bs
    assert Bitstream.from_bytes(bytearray(data)) == bs
    assert Bitstream.from_bytes(memoryview(data)) == bs
    assert back.to_bytes() == data
    assert bs.header_dict()["total_bytes"] == len(data)


def test_layout_is_as_documented():
    bs = make((b"AB", b"C", b"D" * 200), width=0x0102, height=0x0304, rate_q=0x0506, strength_q=0x0708,
              seed=0x090A0B0C)
    data = bs.to_bytes()
    assert data[:4] == MAGIC == b"DIFO"
    assert data[4] == FORMAT_VERSION == 2
    assert data[5] == 0x01
    assert data[6:14] == FP
    assert data[14:16] == b"\x02\x01"
    assert data[16:18] == b"\x04\x03"
    assert data[18:20] == b"\x06\x05"
    assert data[20:22] == b"\x08\x07"
    assert data[22:26] == b"\x0c\x0b\x0a\x09"
    assert data[26] == 3
    assert data[27:31] == b"\x02\x01\xc8\x01"  # varints 2, 1, 200
    assert data[31:-4] == b"ABC" + b"D" * 200
    assert struct.unpack("<I", data[-4:])[0] == zlib.crc32(data[:-4])
    base_only = make((b"xyz",)).to_bytes()
    assert base_only[5] == 0 and base_only[26] == 1 and base_only[27] == 3
    assert len(base_only) == 27 + 1 + 3 + 4


def test_properties_and_header_dict():
    bs = make((b"a", b"bb", b"ccc"), rate_q=65535, strength_q=0)
    assert bs.has_residual and not make().has_residual
    assert bs.rate == 1.0 and bs.strength == 0.0
    d = bs.header_dict()
    json.dumps(d)
    assert d == {
        "format_version": 2,
        "family": "DiffO",
        "fingerprint": FP.hex(),
        "width": 64,
        "height": 48,
        "rate": 1.0,
        "strength": 0.0,
        "seed": 7,
        "stream_bytes": [1, 2, 3],
        "total_bytes": len(bs.to_bytes()),
        "bpp": 8 * len(bs.to_bytes()) / (64 * 48),
    }
    r = bs.replace(seed=9)
    assert r.seed == 9 and r.streams == bs.streams and bs.seed == 7


def test_bits_per_pixel_and_quantize():
    assert bits_per_pixel(100, 10, 10) == 8.0
    assert quantize_unit(0.0) == 0 and quantize_unit(1.0) == 65535 and quantize_unit(0.5) == 32768
    for x in (0.0, 0.25, 1 / 3, 0.9, 1.0):
        assert abs(dequantize_unit(quantize_unit(x)) - x) <= 0.5 / 65535 + 1e-12


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.1, 1.1])
def test_quantize_unit_rejects(bad):
    with pytest.raises(ValueError) as e:
        quantize_unit(bad)
    assert repr(bad) in str(e.value) or str(bad) in str(e.value)


def test_list_streams_normalised():
    assert make([b"a"]) == make((b"a",))


# ---------------------------------------------------------------- writer validation

@pytest.mark.parametrize(
    "changes, word",
    [
        (dict(fingerprint=b"short"), "fingerprint"),
        (dict(fingerprint=b"x" * 9), "fingerprint"),
        (dict(width=0), "width"),
        (dict(height=65536), "height"),
        (dict(width=20000, height=20000), "exceeds"),
        (dict(rate_q=-1), "rate_q"),
        (dict(strength_q=70000), "strength_q"),
        (dict(seed=2**32), "seed"),
        (dict(width=1.5), "width"),
        (dict(streams=(b"a", b"b")), "sub-stream"),
        (dict(streams=()), "sub-stream"),
        (dict(streams=("text",)), "sub-stream"),
    ],
)
def test_to_bytes_validates(changes, word):
    with pytest.raises(ValueError) as e:
        make().replace(**changes).to_bytes()
    assert isinstance(e.value, BitstreamError)
    assert word in str(e.value)


# ---------------------------------------------------------------- reader errors

def expect(data, word, cls=BitstreamError):
    with pytest.raises(cls) as e:
        Bitstream.from_bytes(data)
    assert type(e.value) is cls, type(e.value)
    assert word in str(e.value), str(e.value)
    return e.value


def test_not_bytes_is_type_error():
    for bad in ("DIFO", 31, None, [1, 2]):
        with pytest.raises(TypeError):
            Bitstream.from_bytes(bad)


def test_empty_and_short():
    expect(b"", "truncated")
    expect(b"DI", "truncated")
    expect(b"DIFO", "truncated")
    expect(VALID[:12], "header needs 27 bytes, file has 12")
    expect(VALID[:29], "truncated")


def test_bad_magic():
    err = expect(b"PK\x03\x04" + b"\x00" * 60, "magic")
    assert "not a .diffo file" in str(err) and "PK" in str(err)
    expect(b"X", "magic")


def test_newer_version():
    data = bytearray(VALID)
    data[4] = 4
    err = expect(reseal(bytes(data[:-4])), "newer", UnsupportedVersionError)
    assert "format 4" in str(err) and "reads formats 1, 2, 3" in str(err) and "upgrade ComfyUI-DiffO" in str(err)
    expect(b"DIFO\x07", "newer", UnsupportedVersionError)  # version wins over truncation
    assert issubclass(UnsupportedVersionError, BitstreamError) and issubclass(BitstreamError, DiffoError)


def test_version_zero():
    expect(reseal(b"DIFO\x00" + body_of(VALID)[5:]), "version 0")


def test_checksum_mismatch():
    data = bytearray(VALID_RES)
    data[40] ^= 0x10
    err = expect(bytes(data), "checksum mismatch")
    assert "damaged" in str(err)
    data = bytearray(VALID)
    data[-1] ^= 0xFF
    expect(bytes(data), "checksum")
    data = bytearray(VALID)
    data[5] = 0x80  # damage in the flags byte is reported as damage, not as a flag problem
    expect(bytes(data), "checksum")


def test_unknown_flags():
    body = bytearray(body_of(VALID))
    body[5] = 0x02
    expect(reseal(bytes(body)), "unknown flags 0x02")


def test_zero_and_oversized_dimensions():
    for w, h in ((0, 5), (5, 0)):
        body = bytearray(body_of(VALID))
        body[14:18] = struct.pack("<HH", w, h)
        expect(reseal(bytes(body)), "size")
    body = bytearray(body_of(VALID))
    body[14:18] = struct.pack("<HH", 65535, 65535)
    err = expect(reseal(bytes(body)), "exceeds")
    assert "65535x65535" in str(err) and str(MAX_PIXELS) in str(err)


def test_stream_count_vs_flags():
    body = bytearray(body_of(VALID))
    body[26] = 3
    expect(reseal(bytes(body)), "sub-stream count")
    body = bytearray(body_of(VALID_RES))
    body[26] = 1
    expect(reseal(bytes(body)), "sub-stream count")
    body = bytearray(body_of(VALID_RES))
    body[5] = 0
    expect(reseal(bytes(body)), "sub-stream count")


def test_varint_errors():
    head = body_of(VALID)[:27]
    expect(reseal(head + b"\x80\x80\x80\x80\x01"), "overlong")
    expect(reseal(head + b"\x80\x00"), "minimally")
    expect(reseal(head + b"\x80"), "truncated")
    expect(reseal(head), "truncated")


def test_lengths_vs_payload():
    head = body_of(VALID)[:27]
    err = expect(reseal(head + b"\x05abc"), "exceed")
    assert "5" in str(err)
    expect(reseal(head + b"\x02abc"), "trailing bytes")
    expect(reseal(body_of(VALID) + b"!"), "trailing bytes")
    res_head = body_of(VALID_RES)[:27]
    expect(reseal(res_head + b"\x01\x01\x7f" + b"abc"), "exceed")


def test_every_truncation_fails():
    for data in (VALID, VALID_RES, make((b"",)).to_bytes()):
        for k in range(len(data)):
            with pytest.raises(BitstreamError):
                Bitstream.from_bytes(data[:k])


# ---------------------------------------------------------------- property-based fuzzing

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def parse_or_error(data: bytes):
    """from_bytes must return a Bitstream or raise BitstreamError; nothing else may escape."""
    try:
        return Bitstream.from_bytes(data)
    except BitstreamError:
        return None


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    parse_or_error(data)


@FUZZ
@given(st.binary(max_size=100))
def test_fuzz_arbitrary_bytes_after_magic(tail):
    for version in (b"\x00", b"\x01", b"\x02"):
        data = MAGIC + version + tail
        parse_or_error(data)
        parse_or_error(reseal(data))  # a correct CRC makes the field checks run


bitstreams = st.builds(
    Bitstream,
    fingerprint=st.binary(min_size=FINGERPRINT_BYTES, max_size=FINGERPRINT_BYTES),
    width=st.integers(1, 16384),
    height=st.integers(1, 16384),
    rate_q=st.integers(0, 65535),
    strength_q=st.integers(0, 65535),
    seed=st.integers(0, 2**32 - 1),
    streams=st.one_of(
        st.tuples(st.binary(max_size=300)),
        st.tuples(st.binary(max_size=50), st.binary(max_size=50), st.binary(max_size=300)),
    ),
)


@st.composite
def damaged(draw):
    bs = draw(bitstreams)
    data = bytearray(bs.to_bytes())
    other = draw(bitstreams).to_bytes()
    kind = draw(st.sampled_from(["flip", "replace", "truncate", "splice", "insert", "delete"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) * 8 - 1))
            data[i // 8] ^= 1 << (i % 8)
    elif kind == "replace":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "splice":
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))):]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    else:
        i = draw(st.integers(0, len(data) - 1))
        del data[i : i + draw(st.integers(1, 8))]
    return bs, bytes(data)


@FUZZ
@given(damaged())
def test_fuzz_damaged_streams(case):
    original, data = case
    result = parse_or_error(data)
    if result is not None:
        # Only possible when the bytes still form a valid file (CRC matches), e.g. a no-op
        # splice or a flip that was undone: then the parse must be exact.
        assert result.to_bytes() == data
        if data == original.to_bytes():
            assert result == original


@FUZZ
@given(bitstreams)
def test_fuzz_round_trip(bs):
    data = bs.to_bytes()
    assert Bitstream.from_bytes(data) == bs
    assert bs.header_dict()["total_bytes"] == len(data)


def test_format_1_files_parse_and_keep_their_version():
    """Format 1 (CompressAI's coder) has the same layout: it parses, says so, and writes back byte for byte."""
    old = make((b"AB", b"C", b"D")).replace(format_version=1)
    data = old.to_bytes()
    assert data[4] == 1
    back = Bitstream.from_bytes(data)
    assert back.format_version == 1 and back.header_dict()["format_version"] == 1 and back.to_bytes() == data
    with pytest.raises(BitstreamError, match="format_version must be one of"):
        make().replace(format_version=7).to_bytes()


# ------------------------------------------------------------------------------------------- format 3: families
def test_format_3_names_the_family_in_the_flags_and_round_trips():
    bs = Bitstream(fingerprint=FP, width=64, height=48, rate_q=0, strength_q=65535, seed=3, streams=(b"zz", b"yyy"),
                   format_version=3, family=1)
    data = bs.to_bytes()
    assert data[5] == 0x10  # flags: family 1 in bits 4-7, no residual bit
    back = Bitstream.from_bytes(data)
    assert back == bs and back.header_dict()["family"] == "OSDiff"


def test_families_are_checked_against_the_format_and_the_stream_count():
    with pytest.raises(BitstreamError, match="format 2 carries DiffO streams only"):
        Bitstream(fingerprint=FP, width=8, height=8, rate_q=0, strength_q=0, seed=0, streams=(b"a", b"b"),
                  format_version=2, family=1).to_bytes()
    with pytest.raises(BitstreamError, match=r"OSDiff stream holds 2 sub-streams \(z, y\), got 3"):
        Bitstream(fingerprint=FP, width=8, height=8, rate_q=0, strength_q=0, seed=0, streams=(b"a", b"b", b"c"),
                  format_version=3, family=1).to_bytes()
    good = bytearray(Bitstream(fingerprint=FP, width=8, height=8, rate_q=0, strength_q=0, seed=0,
                               streams=(b"a", b"b"), format_version=3, family=1).to_bytes())

    def with_flags(flags: int) -> bytes:
        data = bytearray(good)
        data[5] = flags
        body = bytes(data[:-4])
        return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)

    with pytest.raises(BitstreamError, match="unknown model family 7"):
        Bitstream.from_bytes(with_flags(0x70))
    with pytest.raises(BitstreamError, match="residual flag is set in an OSDiff stream"):
        Bitstream.from_bytes(with_flags(0x11))
    v2 = bytearray(with_flags(0x10))
    v2[4] = 2
    body = bytes(v2[:-4])
    with pytest.raises(BitstreamError, match="unknown flags 0x10"):
        Bitstream.from_bytes(body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF))
