"""Format compatibility: a committed `.diffo` stream (tests/golden/, made by tools/make_golden.py) must keep
decoding to exactly the same latent and pixels. A failure here means existing users' files would decode
differently: fix the change, or bump the format version and document it (docs/bitstream.md)."""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).with_name("golden")
ROOT = GOLDEN.parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_golden import decoded_hashes, sha256  # noqa: E402


@pytest.fixture(scope="module")
def golden():
    from diffo.codec import DiffoCodec

    return (DiffoCodec.from_pretrained(GOLDEN / "model"), (GOLDEN / "golden.diffo").read_bytes(),
            json.loads((GOLDEN / "golden.json").read_text()))


def test_golden_stream_decodes_to_the_recorded_latent_and_pixels(golden):
    from diffo import pipeline

    model, data, record = golden
    assert sha256(data) == record["stream_sha256"], "the committed stream itself changed"
    assert model.fingerprint.hex() == record["fingerprint"], "the committed model's fingerprint changed"
    assert pipeline.read_header(data).header_dict() == record["header"]
    assert decoded_hashes(model, data) == {k: record[k] for k in ("c_hat_sha256", "image_sha256")}


@pytest.mark.parametrize("threads", [1, 2])
def test_golden_stream_in_a_fresh_process(threads):
    """The same hashes from a separate interpreter with 1 or 2 threads (no state shared with this one)."""
    from diffo import child

    code = (f"import sys, json, torch; sys.path.insert(0, {str(ROOT / 'tools')!r}); "
            "from make_golden import decoded_hashes; from diffo.codec import DiffoCodec; from pathlib import Path; "
            f"g = Path({str(GOLDEN)!r}); torch.set_num_threads({threads}); "
            "print(json.dumps(decoded_hashes(DiffoCodec.from_pretrained(g / 'model'),"
            " (g / 'golden.diffo').read_bytes())))")
    got = child.run_json(code, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert "error" not in got, got["error"]
    record = json.loads((GOLDEN / "golden.json").read_text())
    assert got == {k: record[k] for k in ("c_hat_sha256", "image_sha256")}


def test_a_stream_from_a_newer_format_version_says_so(golden):
    from diffo import pipeline
    from diffo.errors import UnsupportedVersionError

    model, data, _ = golden
    newer = bytearray(data)
    newer[4] += 1  # the format version byte (docs/bitstream.md)
    with pytest.raises(UnsupportedVersionError, match="made by a newer version of DiffO"):
        pipeline.decode(model, bytes(newer))


def test_hash_helper_sees_a_one_pixel_change():
    a = torch.zeros(3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, 0] = 1
    assert sha256(a) != sha256(b) and sha256(b"x") == hashlib.sha256(b"x").hexdigest()
