"""Regenerates the format-compatibility fixture in tests/golden/: a small model, a `.diffo` stream it made,
and the hashes of what decoding that stream must give (checked by tests/test_golden.py).

    python tools/make_golden.py            # write tests/golden/ (refuses to replace an existing fixture)
    python tools/make_golden.py --force    # replace it: only for an intended, documented format change

The fixture is what keeps old `.diffo` files readable: a change to the container, the entropy coder or the
decoder that alters what an existing stream decodes to makes the test fail. The model is a randomly
initialised (seeded) DiffO model of the tiny architecture at reduced width, so the fixture stays ~1.4 MB and
does not change when the embedded model is retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"

MICRO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16], mid_block_add_attention=False, scaling_factor=1.0,
)
MICRO_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[16, 16],
    down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2, norm_num_groups=8,
    cross_attention_dim=16, attention_head_dim=8, mid_block_type="UNetMidBlock2DCrossAttn",
)
MICRO_LATENT_CODEC = dict(hidden=16, code_dim=4, codebook_size=32, y_channels=16, z_channels=8, num_gains=8)


def source_image(h: int = 44, w: int = 70) -> torch.Tensor:
    """A deterministic test picture (smooth gradients and a hard edge), odd-sized so padding is exercised."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    edge = (x + 0.5 * y > 0.6).float()
    return torch.stack([x, y, 0.3 + 0.5 * edge]).clamp(0, 1)


def sha256(t: torch.Tensor | bytes) -> str:
    data = t if isinstance(t, bytes) else t.detach().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def decoded_hashes(model, data: bytes) -> dict:
    """What a reader must reproduce from the stream: the entropy-decoded latent (exact integers times exact
    scales) and the final 8-bit image."""
    from diffo import pipeline
    from diffo.image import to_uint8

    _, c_hat = pipeline.entropy_decode(model, data)
    return {"c_hat_sha256": sha256(c_hat.float()), "image_sha256": sha256(to_uint8(pipeline.decode(model, data)))}


def build() -> dict:
    from diffo import pipeline
    from diffo.codec import DiffoCodec

    torch.manual_seed(1234)
    model = DiffoCodec(vae_config=MICRO_VAE, unet_config=MICRO_UNET, latent_codec_config=MICRO_LATENT_CODEC,
                       control_embedding_channels=8, prediction_type="residual", name="diffo-golden").eval()
    torch.nn.init.normal_(model.denoiser.unet.conv_out.weight, std=0.05)  # noise must matter
    model.update()
    tmp = GOLDEN.with_name(".golden.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", half_precision=True)  # as models ship
    model = DiffoCodec.from_pretrained(tmp / "model")  # hashes of the model as stored
    data = pipeline.encode(model, source_image(), rate=0.6, seed=11)
    (tmp / "golden.diffo").write_bytes(data)
    record = {"stream_sha256": sha256(data), "fingerprint": model.fingerprint.hex(),
              "header": pipeline.read_header(data).header_dict(), **decoded_hashes(model, data)}
    (tmp / "golden.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="replace an existing fixture")
    args = ap.parse_args()
    if GOLDEN.exists() and not args.force:
        print(f"{GOLDEN} exists: replacing it breaks compatibility with existing files; pass --force if meant",
              file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    record = build()
    shutil.rmtree(GOLDEN, ignore_errors=True)
    GOLDEN.with_name(".golden.tmp").rename(GOLDEN)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
