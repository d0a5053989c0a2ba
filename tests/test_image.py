"""Tests for diffo.image: every PIL mode into [3, H, W] float32, warnings/errors, padding, psnr."""

import io
import math
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffo.errors import ImageInputError
from diffo.image import crop_to, load_image, pad_to_multiple, psnr, to_pil, to_uint8


def _check(t, h, w):
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert tuple(t.shape) == (3, h, w)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    return t


def _save(tmp_path, im, name, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def _gradient(h=5, w=7):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 30 % 256, y * 50 % 256, (x + y) * 20 % 256], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- modes


def test_rgb_exact_and_silent(tmp_path):
    arr = _gradient()
    p = _save(tmp_path, Image.fromarray(arr, "RGB"), "rgb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _check(load_image(p), 5, 7)
        t2 = _check(load_image(str(p)), 5, 7)
    assert torch.equal(t, t2)
    assert torch.equal(to_uint8(t).permute(1, 2, 0), torch.from_numpy(arr))


def test_pil_input_not_modified():
    im = Image.fromarray(_gradient(), "RGB")
    before = im.tobytes()
    _check(load_image(im), 5, 7)
    assert im.tobytes() == before and im.mode == "RGB"


def test_grayscale_L(tmp_path):
    arr = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    p = _save(tmp_path, Image.fromarray(arr, "L"), "l.png")
    with pytest.warns(UserWarning, match="grayscale image converted to RGB"):
        t = _check(load_image(p), 5, 7)
    u = to_uint8(t)
    for c in range(3):
        assert torch.equal(u[c], torch.from_numpy(arr))


def test_bilevel_1(tmp_path):
    im = Image.new("1", (7, 5), 0)
    im.putpixel((3, 2), 1)
    p = _save(tmp_path, im, "one.png")
    with pytest.warns(UserWarning, match="grayscale image converted to RGB"):
        t = _check(load_image(p), 5, 7)
    assert float(t[:, 2, 3].min()) == 1.0 and float(t[:, 0, 0].max()) == 0.0


def test_palette_P(tmp_path):
    im = Image.fromarray(_gradient(), "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert im.mode == "P" and "transparency" not in im.info
    p = _save(tmp_path, im, "p.png")
    with pytest.warns(UserWarning, match="palette image converted to RGB"):
        t = _check(load_image(p), 5, 7)
    expected = np.array(im.convert("RGB"))
    assert torch.equal(to_uint8(t).permute(1, 2, 0), torch.from_numpy(expected))


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (7, 5), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    im.putpixel((1, 1), 1)
    im.info["transparency"] = 1
    p = _save(tmp_path, im, "pt.png", transparency=1)
    with pytest.raises(ImageInputError, match="alpha channel.*drop_alpha=True"):
        load_image(p)
    with pytest.warns(UserWarning) as rec:
        t = _check(load_image(p, drop_alpha=True), 5, 7)
    messages = " | ".join(str(w.message) for w in rec)
    assert "composited onto white" in messages and "palette image converted to RGB" in messages
    assert torch.equal(t[:, 1, 1], torch.ones(3))  # transparent pixel -> white
    assert torch.equal(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


def test_palette_with_unused_transparency_is_silent_about_alpha(tmp_path):
    im = Image.new("P", (3, 3), 0)
    im.putpalette([10, 20, 30, 0, 255, 0] + [0] * (254 * 3))
    im.info["transparency"] = 1  # index 1 never used -> fully opaque
    with pytest.warns(UserWarning, match="palette image") as rec:
        t = _check(load_image(im), 3, 3)
    assert not any("alpha" in str(w.message) for w in rec)
    assert to_uint8(t)[:, 0, 0].tolist() == [10, 20, 30]


def test_PA():
    im = Image.new("PA", (4, 3))
    im.putpalette([0, 0, 255] * 256)
    with pytest.raises(ImageInputError, match="alpha channel"):
        load_image(im)  # alpha 0 everywhere
    with pytest.warns(UserWarning, match="composited onto white"), pytest.warns(UserWarning, match="palette"):
        t = _check(load_image(im, drop_alpha=True), 3, 4)
    assert torch.equal(t, torch.ones(3, 3, 4))


def test_LA(tmp_path):
    arr = np.zeros((5, 7, 2), dtype=np.uint8)
    arr[..., 0] = 100
    arr[..., 1] = 255
    arr[0, 0, 1] = 0
    p = _save(tmp_path, Image.fromarray(arr, "LA"), "la.png")
    with pytest.raises(ImageInputError, match=r"alpha channel \(transparency\); DiffO codes RGB only"):
        load_image(p)
    with pytest.warns(UserWarning, match="composited onto white"), pytest.warns(UserWarning, match="grayscale"):
        t = _check(load_image(p, drop_alpha=True), 5, 7)
    assert torch.equal(t[:, 0, 0], torch.ones(3))
    assert to_uint8(t)[:, 1, 1].tolist() == [100, 100, 100]


def test_LA_opaque_dropped_without_alpha_warning():
    arr = np.full((2, 3, 2), 255, dtype=np.uint8)
    arr[..., 0] = 40
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = _check(load_image(Image.fromarray(arr, "LA")), 2, 3)
    assert not any("alpha" in str(w.message) for w in rec)
    assert to_uint8(t).unique().tolist() == [40]


def test_RGBA_opaque_silent(tmp_path):
    arr = np.dstack([_gradient(), np.full((5, 7), 255, np.uint8)])
    p = _save(tmp_path, Image.fromarray(arr, "RGBA"), "opaque.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _check(load_image(p), 5, 7)
    assert torch.equal(to_uint8(t).permute(1, 2, 0), torch.from_numpy(_gradient()))


def test_RGBA_transparent(tmp_path):
    arr = np.dstack([_gradient(), np.full((5, 7), 255, np.uint8)])
    arr[2, 3, 3] = 0
    arr[4, 6, 3] = 128
    p = _save(tmp_path, Image.fromarray(arr, "RGBA"), "transparent.png")
    with pytest.raises(ImageInputError, match="--drop-alpha"):
        load_image(p)
    with pytest.warns(UserWarning, match="composited onto white"):
        t = _check(load_image(p, drop_alpha=True), 5, 7)
    assert torch.equal(t[:, 2, 3], torch.ones(3))
    a = 128 / 255
    expected = torch.from_numpy(arr[4, 6, :3].astype(np.float32)) / 255 * a + (1 - a)
    assert torch.allclose(t[:, 4, 6], expected, atol=1e-6)
    # opaque pixels unchanged
    assert to_uint8(t)[:, 0, 1].tolist() == arr[0, 1, :3].tolist()


def test_premultiplied_modes():
    rgba = Image.new("RGBA", (2, 2), (200, 100, 50, 255))
    t = _check(load_image(rgba.convert("RGBa")), 2, 2)
    assert to_uint8(t)[:, 0, 0].tolist() == [200, 100, 50]
    la = Image.new("LA", (2, 2), (90, 255)).convert("La")
    with pytest.warns(UserWarning, match="grayscale"):
        t = _check(load_image(la), 2, 2)
    assert to_uint8(t)[:, 1, 1].tolist() == [90, 90, 90]
    with pytest.raises(ImageInputError, match="alpha"):
        load_image(Image.new("RGBA", (2, 2), (1, 2, 3, 0)).convert("RGBa"))


def test_rgb_with_transparent_colour_key(tmp_path):
    im = Image.new("RGB", (3, 2), (5, 6, 7))
    im.putpixel((0, 0), (1, 2, 3))
    p = _save(tmp_path, im, "trns.png", transparency=(1, 2, 3))
    with pytest.raises(ImageInputError, match="alpha"):
        load_image(p)
    with pytest.warns(UserWarning, match="composited"):
        t = load_image(p, drop_alpha=True)
    assert torch.equal(t[:, 0, 0], torch.ones(3))


def test_cmyk(tmp_path):
    im = Image.new("CMYK", (7, 5), (0, 255, 255, 0))  # red
    p = _save(tmp_path, im, "cmyk.jpg", quality=100)
    with pytest.warns(UserWarning, match="CMYK image converted to RGB"):
        t = _check(load_image(p), 5, 7)
    r, g, b = to_uint8(t)[:, 2, 3].tolist()
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_other_colour_spaces(mode):
    im = Image.fromarray(_gradient(), "RGB").convert(mode) if mode != "LAB" else Image.new("LAB", (7, 5), (128, 128, 128))
    with pytest.warns(UserWarning, match=f"{mode} image converted to RGB"):
        _check(load_image(im), 5, 7)


def test_i16(tmp_path):
    arr = np.array([[0, 65535, 32768, 257 * 10]], dtype=np.uint16).repeat(3, axis=0)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    p = _save(tmp_path, im, "i16.png")
    with pytest.warns(UserWarning, match="precision reduced to 8 bits per channel"):
        t = _check(load_image(p), 3, 4)
    u = to_uint8(t)
    assert u[:, 0, :].tolist() == [[0, 255, 128, 10]] * 3
    assert torch.equal(u[0], u[1]) and torch.equal(u[1], u[2])


def test_i16_big_endian():
    arr = np.array([[0, 65535, 257 * 20]], dtype=">u2")
    im = Image.fromarray(arr)
    assert im.mode == "I;16B"
    with pytest.warns(UserWarning, match="precision reduced"):
        t = _check(load_image(im), 1, 3)
    assert to_uint8(t)[0, 0].tolist() == [0, 255, 20]


def test_mode_I(tmp_path):
    # mode I holding 16-bit data (how PIL stores some 16-bit PNG/TIFF): divided by 65535
    im = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.int32), mode="I")
    assert im.mode == "I"
    with pytest.warns(UserWarning, match="precision reduced to 8 bits per channel"):
        t = _check(load_image(im), 1, 3)
    assert to_uint8(t)[0, 0].tolist() == [0, 255, 100]
    # beyond 16 bits (and negative): clipped at 0, divided by 2**31 - 1
    im = Image.fromarray(np.array([[-5, 2**31 - 1, 2**30]], dtype=np.int32), mode="I")
    with pytest.warns(UserWarning, match="precision reduced"):
        t = _check(load_image(im), 1, 3)
    assert to_uint8(t)[0, 0].tolist() == [0, 255, 128]
    # and through a file
    p = _save(tmp_path, Image.fromarray(np.full((2, 2), 30000, np.int32), mode="I"), "i.tif")
    with pytest.warns(UserWarning, match="precision reduced"):
        _check(load_image(p), 2, 2)


def test_mode_F(tmp_path):
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32), mode="F")
    with pytest.warns(UserWarning, match="precision reduced to 8 bits per channel"):
        t = _check(load_image(im), 1, 4)
    # -0.2 makes the data not 0..1, so it is treated as 0..255
    assert to_uint8(t)[0, 0].tolist() == [0, 0, 1, 0]
    im = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    with pytest.warns(UserWarning, match="precision reduced"):
        t = _check(load_image(im), 1, 3)
    assert to_uint8(t)[0, 0].tolist() == [0, 128, 255]
    im = Image.fromarray(np.array([[0.0, 127.6, 300.0, float("nan")]], dtype=np.float32), mode="F")
    with pytest.warns(UserWarning, match="precision reduced"):
        t = _check(load_image(im), 1, 4)
    assert to_uint8(t)[0, 0].tolist() == [0, 128, 255, 0]
    p = _save(tmp_path, Image.fromarray(np.full((2, 3), 0.25, np.float32), mode="F"), "f.tif")
    with pytest.warns(UserWarning, match="precision reduced"):
        t = _check(load_image(p), 2, 3)
    assert to_uint8(t).unique().tolist() == [64]


# ---------------------------------------------------------------------------------- EXIF, animation, ICC


def test_exif_rotated_jpeg(tmp_path):
    arr = np.zeros((4, 8, 3), dtype=np.uint8)  # landscape 8 wide x 4 high
    arr[:, :4] = (255, 0, 0)  # left half red
    arr[:, 4:] = (0, 0, 255)  # right half blue
    im = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    p = _save(tmp_path, im, "rot.jpg", exif=exif.tobytes(), quality=100)
    t = _check(load_image(p), 8, 4)  # portrait after transposition
    u = to_uint8(t).int()
    # rotated 90 degrees clockwise: the old left (red) is now at the top
    assert u[0, 1, 2] > 200 and u[2, 1, 2] < 60
    assert u[2, 6, 2] > 200 and u[0, 6, 2] < 60


def test_animated_gif_first_frame(tmp_path):
    f0 = Image.new("RGB", (6, 4), (255, 0, 0))
    f1 = Image.new("RGB", (6, 4), (0, 0, 255))
    p = tmp_path / "anim.gif"
    f0.save(p, save_all=True, append_images=[f1], duration=100, loop=0)
    with Image.open(p) as chk:
        assert chk.n_frames == 2
    with pytest.warns(UserWarning, match="first frame"), pytest.warns(UserWarning, match="palette"):
        t = _check(load_image(p), 4, 6)
    r, g, b = to_uint8(t)[:, 1, 1].tolist()
    assert r > 200 and b < 60


def test_srgb_icc_profile_is_silent_and_lossless(tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    arr = _gradient()
    p = _save(tmp_path, Image.fromarray(arr, "RGB"), "srgb.png", icc_profile=icc)
    with Image.open(p) as chk:
        assert chk.info.get("icc_profile")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _check(load_image(p), 5, 7)
    assert torch.equal(to_uint8(t).permute(1, 2, 0), torch.from_numpy(arr))


def _rgb_icc_profile(description, red, green, blue, gamma=2.2):
    """A minimal ICC v2 matrix/TRC RGB display profile (PIL.ImageCms can only create sRGB/LAB/XYZ)."""

    def s15(v):
        return struct.pack(">i", int(round(v * 65536)))

    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    def curv(g):
        return b"curv" + bytes(4) + struct.pack(">IH", 1, int(round(g * 256))) + bytes(2)

    def desc(text):
        t = text.encode("ascii") + b"\0"
        return b"desc" + bytes(4) + struct.pack(">I", len(t)) + t + bytes(8) + bytes(3) + bytes(67)

    tags = [(b"desc", desc(description)), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(*red)), (b"gXYZ", xyz(*green)), (b"bXYZ", xyz(*blue)),
            (b"rTRC", curv(gamma)), (b"gTRC", curv(gamma)), (b"bTRC", curv(gamma))]
    start = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", start + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">II", 128 + len(body), 0) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + body


_SRGB_R, _SRGB_G, _SRGB_B = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)


def test_non_srgb_icc_profile_is_converted(tmp_path):
    # primaries swapped red <-> blue: pure source red must come out as sRGB blue
    icc = _rgb_icc_profile("swapped primaries", _SRGB_B, _SRGB_G, _SRGB_R)
    p = _save(tmp_path, Image.new("RGB", (3, 2), (255, 0, 0)), "swapped.png", icc_profile=icc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = _check(load_image(p), 2, 3)
    assert to_uint8(t)[:, 1, 1].tolist() == [0, 0, 255]
    # a description that merely mentions sRGB does not skip the conversion (gamma 1.0 vs sRGB's curve)
    icc = _rgb_icc_profile("linear sRGB primaries", _SRGB_R, _SRGB_G, _SRGB_B, gamma=1.0)
    im = Image.new("RGB", (1, 1), (64, 64, 64))
    im.info["icc_profile"] = icc
    assert to_uint8(load_image(im))[:, 0, 0].tolist()[0] > 100  # linear 0.25 is sRGB ~137


def test_unusable_icc_profile_warns(tmp_path):
    from PIL import ImageCms

    lab_like = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # wrong class for RGB data
    p = _save(tmp_path, Image.fromarray(_gradient(), "RGB"), "badicc.png", icc_profile=lab_like)
    with pytest.warns(UserWarning, match="colours may be off"):
        _check(load_image(p), 5, 7)
    p = _save(tmp_path, Image.fromarray(_gradient(), "RGB"), "junkicc.png", icc_profile=b"not a profile")
    with pytest.warns(UserWarning, match="colours may be off"):
        _check(load_image(p), 5, 7)


# ---------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.png"):
        load_image(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "fake.png"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageInputError, match="not an image \\(or an unsupported format\\): .*fake.png"):
        load_image(p)
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(tmp_path)  # a directory


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "trunc.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(p)


def test_zero_size():
    with pytest.raises(ImageInputError, match="size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageInputError, match="size"):
        load_image(Image.new("RGB", (5, 0)))


def test_wrong_type():
    with pytest.raises(TypeError):
        load_image(42)


# --------------------------------------------------------------------------- tensors, padding, metrics


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 5), (64, 64), (65, 3)])
def test_pad_crop_roundtrip(hw):
    h, w = hw
    x = torch.rand(2, 3, h, w)
    padded, size = pad_to_multiple(x, 64)
    assert size == (h, w)
    assert padded.shape[-2] % 64 == 0 and padded.shape[-1] % 64 == 0
    assert padded.shape[-2] >= h and padded.shape[-1] >= w and padded.shape[-2] - h < 64
    # replicate padding: the last row/column is repeated
    assert torch.equal(padded[..., h:, :w], x[..., h - 1 : h, :].expand(-1, -1, padded.shape[-2] - h, -1))
    assert torch.equal(crop_to(padded, size), x)


def test_to_uint8_and_to_pil():
    x = torch.tensor([0.0, 0.5, 1.0, -0.1, 1.2, 0.5 / 255, 1.5 / 255, float("nan")]).view(1, 1, 8).expand(3, 1, 8)
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    assert u[0, 0].tolist() == [0, 128, 255, 0, 255, 0, 2, 0]  # round half to even, clamped, nan -> 0
    assert torch.equal(to_uint8(x.half()), to_uint8(x.half().float()))
    pil = to_pil(x.contiguous())
    assert pil.mode == "RGB" and pil.size == (8, 1)
    assert np.asarray(pil)[0, :, 0].tolist() == u[0, 0].tolist()
    with pytest.raises(ValueError):
        to_pil(torch.zeros(4, 2, 2))


def test_load_to_pil_roundtrip(tmp_path):
    arr = _gradient()
    t = load_image(Image.fromarray(arr, "RGB"))
    assert np.array_equal(np.asarray(to_pil(t)), arr)


def test_psnr():
    a = torch.randint(0, 256, (3, 8, 8)).float() / 255
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1e-3) == math.inf  # identical after uint8 rounding
    b = torch.zeros(3, 4, 4)
    c = torch.zeros(3, 4, 4)
    c[0, 0, 0] = 1.0  # one sample off by 255: mse = 255^2 / 48
    assert psnr(b, c) == pytest.approx(10 * math.log10(48))
    with pytest.raises(ValueError):
        psnr(torch.zeros(3, 2, 2), torch.zeros(3, 2, 3))
