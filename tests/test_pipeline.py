"""encode/decode: sizes, rate modes, target search, determinism, bad streams, wrong model."""

import pytest
import torch

from diffo import pipeline
from diffo.bitstream import Bitstream
from diffo.errors import BitstreamError, ImageInputError, ModelMismatchError, UnsupportedVersionError


@pytest.mark.parametrize("h,w", [(1, 1), (1, 9), (7, 5), (33, 70)])
def test_any_size_round_trips(tiny_model, h, w):
    img = torch.rand(3, h, w)
    for rate in (0.0, 0.7):
        data = pipeline.encode(tiny_model, img, rate=rate)
        head = pipeline.read_header(data)
        assert (head.width, head.height) == (w, h)
        assert pipeline.decode(tiny_model, data).shape == (3, h, w)


def test_same_input_same_bytes(tiny_model):
    img = torch.rand(3, 48, 64)
    assert pipeline.encode(tiny_model, img, rate=0.4) == pipeline.encode(tiny_model, img, rate=0.4)


def test_exactly_one_rate_mode(tiny_model):
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        pipeline.encode(tiny_model, img)
    with pytest.raises(ValueError, match="exactly one"):
        pipeline.encode(tiny_model, img, rate=0.1, bpp=0.1)
    with pytest.raises(ValueError):
        pipeline.encode(tiny_model, img, rate=float("nan"))
    with pytest.raises(ValueError):
        pipeline.encode(tiny_model, img, rate=1.5)


def test_bad_image_tensor(tiny_model):
    with pytest.raises(ImageInputError):
        pipeline.encode(tiny_model, torch.rand(4, 8, 8), rate=0.1)


def test_header_carries_settings(tiny_model):
    data = pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=0.5, seed=1234, strength=0.25)
    head = pipeline.read_header(data)
    assert head.seed == 1234 and head.strength == pytest.approx(0.25, abs=1e-4)
    assert head.rate == pytest.approx(0.5, abs=1e-4)
    assert head.fingerprint == tiny_model.fingerprint
    default = pipeline.read_header(pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=0.5))
    assert default.strength == pytest.approx(tiny_model.strength_for_rate(0.5), abs=1e-4)


def test_strength_and_seed_override_change_the_output(tiny_model):
    data = pipeline.encode(tiny_model, torch.rand(3, 32, 32), rate=0.5)
    a = pipeline.decode(tiny_model, data)
    assert torch.equal(a, pipeline.decode(tiny_model, data))
    assert not torch.equal(a, pipeline.decode(tiny_model, data, seed=99))
    assert not torch.equal(a, pipeline.decode(tiny_model, data, strength=0.9))


def test_damaged_streams_fail_cleanly(tiny_model):
    data = pipeline.encode(tiny_model, torch.rand(3, 32, 32), rate=0.5)
    with pytest.raises(BitstreamError, match="truncated"):
        pipeline.decode(tiny_model, data[:10])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(BitstreamError, match="checksum"):
        pipeline.decode(tiny_model, bytes(flipped))
    with pytest.raises(BitstreamError, match="magic"):
        pipeline.decode(tiny_model, b"\x89PNG" + data[4:])
    newer = bytearray(data)
    newer[4] = 9
    with pytest.raises(UnsupportedVersionError, match="newer"):
        pipeline.decode(tiny_model, bytes(newer))


def test_forged_stream_with_valid_checksum_fails_cleanly(tiny_model):
    data = pipeline.encode(tiny_model, torch.rand(3, 64, 64), rate=0.5)
    bs = Bitstream.from_bytes(data)
    for streams in [(b"",) + bs.streams[1:], (bs.streams[0], b"\xff" * 3, bs.streams[2]),
                    (bs.streams[0], bs.streams[1], b"")]:
        forged = bs.replace(streams=streams).to_bytes()
        try:
            out = pipeline.decode(tiny_model, forged)
        except BitstreamError:
            continue
        assert out.shape == (3, 64, 64)  # rANS may decode garbage symbols; it must not crash


def test_wrong_model_is_refused(tiny_model):
    from diffo.models.diffo.codec import DiffoCodec

    torch.manual_seed(5)
    other = DiffoCodec.from_preset("tiny").eval()
    other.update()
    data = pipeline.encode(tiny_model, torch.rand(3, 16, 16), rate=0.2)
    with pytest.raises(ModelMismatchError, match=tiny_model.fingerprint.hex()):
        pipeline.decode(other, data)


def test_max_bytes_never_exceeded(tiny_model):
    img = torch.rand(3, 64, 96)
    smallest = len(pipeline.encode(tiny_model, img, rate=0.0))
    largest = len(pipeline.encode(tiny_model, img, rate=1.0))
    for limit in sorted({smallest, (smallest + largest) // 2, largest + 10}):
        assert len(pipeline.encode(tiny_model, img, max_bytes=limit)) <= limit
    with pytest.raises(ValueError, match="cannot fit"):
        pipeline.encode(tiny_model, img, max_bytes=smallest - 1)


def test_decode_batch_equals_single_decodes(tiny_model):
    streams = [pipeline.encode(tiny_model, torch.rand(3, 24, 40), rate=r, seed=i)
               for i, r in enumerate((0.0, 0.3, 0.6, 1.0))]
    done = []
    batch = pipeline.decode_batch(tiny_model, streams, progress=lambda i, n: done.append((i, n)))
    assert done[-1] == (4, 4)
    for data, img in zip(streams, batch):
        assert torch.equal(img, pipeline.decode(tiny_model, data))


def test_padding_costs_no_bytes(tiny_model):
    """Only the symbols that cover the image are coded. A 520x260 image is padded to 576x320 internally;
    it must cost no more than the same picture extended to 544x288 (the 32-pixel grid of the base code,
    i.e. the symbols it cannot avoid), and less than the fully padded picture."""
    import torch.nn.functional as F

    torch.manual_seed(4)
    img = F.interpolate(torch.rand(1, 3, 33, 65), size=(260, 520), mode="bilinear")[0]
    grid = F.pad(img[None], (0, 544 - 520, 0, 288 - 260), mode="replicate")[0]
    padded = F.pad(img[None], (0, 576 - 520, 0, 320 - 260), mode="replicate")[0]
    for rate in (0.0, 0.8):
        own = len(pipeline.encode(tiny_model, img, rate=rate))
        assert own <= len(pipeline.encode(tiny_model, grid, rate=rate)) + 4, rate
        assert own < len(pipeline.encode(tiny_model, padded, rate=rate)), rate
