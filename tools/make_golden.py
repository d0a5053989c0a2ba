"""The format-compatibility fixture in tests/golden/ (checked by tests/test_golden.py): a small model, one
`.diffo` stream per format version, all of the same picture at the same rate level and seed, and what decoding
them must give.

    python tools/make_golden.py                 # write tests/golden/ anew (refuses to replace a fixture)
    python tools/make_golden.py --force         # replace it: only for an intended, documented format change
    python tools/make_golden.py --add-format 2  # add the stream of a new format to the existing fixture

What each stream must decode to, and how exactly:
- the entropy-decoded symbols (base indices, residual ŷ): SHA-256, identical on every machine;
- the decoded latent ĉ and the 8-bit image: stored in reference.safetensors as made on the machine named in
  golden.json. Float networks give bit-identical results on one machine and torch build for any thread count or
  batch, but other CPUs (other instruction sets in MKL) may round differently: the test allows what that costs.
The model is a randomly initialised (seeded) DiffO model of the tiny architecture at reduced width, so the
fixture stays ~1.4 MB and does not change when the embedded model is retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import diffo  # noqa: E402,F401  (before torch: sets MKL_CBWR, see diffo/__init__.py)
import torch  # noqa: E402

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


def decoded_symbols(model, data: bytes) -> dict:
    """SHA-256 of the entropy-decoded base indices and residual ŷ of a stream (exact on every machine)."""
    from diffo import pipeline

    idx, y_hat = pipeline.decode_symbols(model, data)
    return {"indices_sha256": sha256(idx), "y_hat_sha256": sha256(y_hat)}


def decoded_tensors(model, data: bytes) -> dict:
    """What a reader computes from the stream: the entropy-decoded latent ĉ and the final 8-bit image."""
    from diffo import pipeline
    from diffo.image import to_uint8

    _, c_hat = pipeline.entropy_decode(model, data)
    return {"c_hat": c_hat.float().contiguous(), "image": to_uint8(pipeline.decode(model, data)).contiguous()}


def decoded_hashes(model, data: bytes) -> dict:
    """SHA-256 of decoded_tensors (bit-exact only on one machine and torch build)."""
    return {f"{k}_sha256": sha256(v) for k, v in decoded_tensors(model, data).items()}


def machine() -> str:
    """The CPU (and its widest vector instructions) and torch build that made the reference tensors."""
    import platform

    cpu, isa = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name"))
        isa = next((f for f in ("avx512f", "avx2", "sse4_2") if f" {f}" in info), "")
    except (OSError, StopIteration):
        pass
    cbwr = os.environ.get("MKL_CBWR", "unset")
    return f"{cpu} ({isa or platform.machine()}), torch {torch.__version__}, MKL_CBWR={cbwr}"


def stream_record(model, data: bytes) -> dict:
    from diffo import pipeline

    return {"stream_sha256": sha256(data), "header": pipeline.read_header(data).header_dict(),
            **decoded_symbols(model, data)}


def encode_golden(model, version: int) -> bytes:
    """The fixture's picture at rate level 0.6, decoder seed 11, written in format `version`."""
    from diffo import pipeline
    from diffo.entropy import coder_for_format

    bs = pipeline.read_header(pipeline.encode(model, source_image(), rate=0.6, seed=11))
    if version == bs.format_version:
        return bs.to_bytes()
    streams = pipeline.code_streams(model, pipeline.analyse(model, source_image()), bs.rate_q,
                                    coder_for_format(version))
    return bs.replace(streams=streams, format_version=version).to_bytes()


def build() -> dict:
    from diffo.bitstream import READ_VERSIONS
    from diffo.models.diffo.codec import DiffoCodec

    torch.manual_seed(1234)
    model = DiffoCodec(vae_config=MICRO_VAE, unet_config=MICRO_UNET, latent_codec_config=MICRO_LATENT_CODEC,
                       control_embedding_channels=8, prediction_type="residual", name="diffo-golden").eval()
    torch.nn.init.normal_(model.denoiser.unet.conv_out.weight, std=0.05)  # noise must matter
    model.update()
    tmp = GOLDEN.with_name(".golden.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model", half_precision=True)  # as models ship
    model = DiffoCodec.from_pretrained(tmp / "model")  # hashes of the model as stored
    record = {"fingerprint": model.fingerprint.hex(), "streams": {}}
    for v in READ_VERSIONS:
        data = encode_golden(model, v)
        (tmp / f"format{v}.diffo").write_bytes(data)
        record["streams"][str(v)] = stream_record(model, data)
    _write_reference(tmp, model, (tmp / f"format{max(READ_VERSIONS)}.diffo").read_bytes(), record)
    return record


def _write_reference(folder: Path, model, data: bytes, record: dict) -> None:
    from safetensors.torch import save_file

    tensors = decoded_tensors(model, data)
    save_file(tensors, folder / "reference.safetensors")
    record["reference"] = {"machine": machine(), **{f"{k}_sha256": sha256(v) for k, v in tensors.items()}}
    (folder / "golden.json").write_text(json.dumps(record, indent=1) + "\n")


def add_format(version: int) -> dict:
    """Add the stream of format `version` to the existing fixture (old streams and model untouched)."""
    from diffo.models.diffo.codec import DiffoCodec

    record = json.loads((GOLDEN / "golden.json").read_text())
    if str(version) in record["streams"]:
        raise SystemExit(f"format {version} is already in {GOLDEN}")
    model = DiffoCodec.from_pretrained(GOLDEN / "model")
    data = encode_golden(model, version)
    (GOLDEN / f"format{version}.diffo").write_bytes(data)
    record["streams"][str(version)] = stream_record(model, data)
    _write_reference(GOLDEN, model, data, record)
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="replace an existing fixture")
    ap.add_argument("--add-format", type=int, metavar="N", help="add the stream of format N to the fixture")
    args = ap.parse_args()
    if args.add_format is not None:
        print(json.dumps(add_format(args.add_format), indent=1))
        return 0
    if GOLDEN.exists() and not args.force:
        print(f"{GOLDEN} exists: replacing it breaks compatibility with existing files; pass --force if meant",
              file=sys.stderr)
        return 1
    record = build()
    shutil.rmtree(GOLDEN, ignore_errors=True)
    GOLDEN.with_name(".golden.tmp").rename(GOLDEN)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
