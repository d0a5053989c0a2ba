"""Regenerates the example workflows in workflows/ (ComfyUI's UI format, the JSON users drag into the browser)
from the short specs below and the nodes' own INPUT_TYPES, so widget order and types always match the nodes.

    python tools/make_workflows.py            # rewrite workflows/*.json
    python tools/make_workflows.py --check    # exit 1 if a file differs from what the specs give

The few core ComfyUI nodes used are described in CORE_NODES (their widget order as ComfyUI 0.33 declares it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# Core nodes: inputs in declaration order as (name, type, default) - type "COMBO" for lists - and outputs.
CORE_NODES = {
    "LoadImage": ([("image", "COMBO", "diffo_example.png"), ("upload", "IMAGEUPLOAD", "image")],
                  [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE", None), ("filename_prefix", "STRING", "ComfyUI")], []),
    "PreviewImage": ([("images", "IMAGE", None)], []),
    "ImageScale": ([("image", "IMAGE", None), ("upscale_method", "COMBO", "nearest-exact"), ("width", "INT", 512),
                    ("height", "INT", 512), ("crop", "COMBO", "disabled")], [("IMAGE", "IMAGE")]),
    "ImageStitch": ([("image1", "IMAGE", None), ("direction", "COMBO", "right"), ("match_image_size", "BOOLEAN", True),
                     ("spacing_width", "INT", 0), ("spacing_color", "COMBO", "white"), ("image2", "IMAGE", None)],
                    [("IMAGE", "IMAGE")]),
    "LatentUpscaleBy": ([("samples", "LATENT", None), ("upscale_method", "COMBO", "nearest-exact"),
                         ("scale_by", "FLOAT", 1.5)], [("LATENT", "LATENT")]),
    "PreviewAny": ([("source", "*", None)], [("STRING", "STRING")]),
    # the one-step decoder on the user's own SD checkpoint (these workflows run in a real ComfyUI only)
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO", "v2-1_512-ema-pruned.safetensors")],
                               [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "KSamplerSelect": ([("sampler_name", "COMBO", "euler")], [("SAMPLER", "SAMPLER")]),
    "BasicGuider": ([("model", "MODEL", None), ("conditioning", "CONDITIONING", None)], [("GUIDER", "GUIDER")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE", None), ("guider", "GUIDER", None), ("sampler", "SAMPLER", None),
                               ("sigmas", "SIGMAS", None), ("latent_image", "LATENT", None)],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT", None), ("vae", "VAE", None)], [("IMAGE", "IMAGE")]),
    "CLIPTextEncode": ([("text", "STRING", ""), ("clip", "CLIP", None)], [("CONDITIONING", "CONDITIONING")]),
    "KSampler": ([("model", "MODEL", None), ("seed", "INT", 0), ("control_after_generate", "COMBO", "fixed"),
                  ("steps", "INT", 20), ("cfg", "FLOAT", 8.0), ("sampler_name", "COMBO", "euler"),
                  ("scheduler", "COMBO", "normal"), ("positive", "CONDITIONING", None),
                  ("negative", "CONDITIONING", None), ("latent_image", "LATENT", None), ("denoise", "FLOAT", 1.0)],
                 [("LATENT", "LATENT")]),
}
# Workflows on the user's own SD checkpoint: the CI runner has no SD backbone; tests/test_comfyui.py runs them in
# a real ComfyUI with a random-weight SD 2.1-base checkpoint.
CHECKPOINT_WORKFLOWS = ("osdiff_compress_checkpoint", "osdiff_decompress_checkpoint", "osdiff_decode_refine")
CODEC = "models/diffo/osdiff-lambda1"  # where the README converts the published checkpoint


NODE_WIDTH, COLUMN_STEP = 270, 300
TALL_NODES = {"LoadImage": 380, "SaveImage": 380, "PreviewImage": 380, "PreviewAny": 240, "DiffOCompare": 260,
              "DiffOSaveBitstream": 200}  # room for the picture or text they show after a run


@dataclass(frozen=True)
class Out:
    """A link from output `slot` of node `node`."""
    node: str
    slot: int = 0


def load_plugin():
    """Import the plugin the way ComfyUI does: by file path, as a package (relative imports)."""
    name = "comfyui_diffo_plugin"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def node_io(node_type: str, classes: dict):
    """([(input name, type, default, is_widget)], [(output name, type)]) of a node type."""
    if node_type in CORE_NODES:
        inputs, outputs = CORE_NODES[node_type]
        return [(n, t, d, t in WIDGET_TYPES | {"COMBO", "IMAGEUPLOAD"}) for n, t, d in inputs], outputs
    cls = classes[node_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (kind, *rest) in spec.get(section, {}).items():
            opts = rest[0] if rest else {}
            is_combo = isinstance(kind, list)
            widget = (is_combo or kind in WIDGET_TYPES) and not opts.get("forceInput")
            default = opts.get("default", kind[0] if is_combo and kind else None)
            inputs.append((name, "COMBO" if is_combo else kind, default, widget))
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    return inputs, list(zip(names, cls.RETURN_TYPES))


def build(spec: list[tuple[str, str, dict]], classes: dict) -> dict:
    ids = {key: i + 1 for i, (key, _, _) in enumerate(spec)}
    io = {key: node_io(t, classes) for key, t, _ in spec}
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    # column = longest path from a source, so the graph reads left to right
    column: dict[str, int] = {}
    for key, _, values in spec:
        column[key] = max([column[v.node] + 1 for v in values.values() if isinstance(v, Out)], default=0)
    rows: dict[int, float] = {}
    for order, (key, node_type, values) in enumerate(spec):
        inputs, outputs = io[key]
        unknown = set(values) - {n for n, *_ in inputs}
        if unknown:
            raise ValueError(f"{key} ({node_type}) has no input {sorted(unknown)}")
        node_inputs, widgets = [], []
        for name, kind, default, is_widget in inputs:
            value = values.get(name, default)
            if isinstance(value, Out):
                src_outputs = io[value.node][1]
                link_type = src_outputs[value.slot][1]
                link_id = len(links) + 1
                links.append([link_id, ids[value.node], value.slot, ids[key], len(node_inputs), link_type])
                out_links.setdefault((value.node, value.slot), []).append(link_id)
                entry = {"name": name, "type": kind if kind != "COMBO" else link_type, "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                node_inputs.append(entry)
                if is_widget:
                    widgets.append(default)
            elif is_widget:
                widgets.append(value)
        size = [NODE_WIDTH, TALL_NODES.get(node_type, 46 + 24 * max(len(node_inputs), len(outputs)) + 26 * len(widgets))]
        col = column[key]
        y = rows.get(col, 0.0)
        rows[col] = y + size[1] + 50
        nodes.append({"id": ids[key], "type": node_type, "pos": [COLUMN_STEP * col, y], "size": size, "flags": {},
                      "order": order, "mode": 0, "inputs": node_inputs,
                      "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                  for i, (n, t) in enumerate(outputs)],
                      "properties": {"Node name for S&R": node_type}, "widgets_values": widgets})
    for node, (key, _, _) in zip(nodes, spec):
        for out in node["outputs"]:
            out["links"] = out_links.get((key, out["slot_index"]), [])
    # open zoomed so the whole graph fits a 1600x1000 window below the toolbar
    width = COLUMN_STEP * max(column.values()) + NODE_WIDTH
    height = max(rows.values())
    scale = round(min(1.0, 1480 / width, 840 / height), 2)
    view = {"scale": scale, "offset": [round(80 / scale), round(110 / scale)]}
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": view}, "version": 0.4}


IMAGE, STREAM = "diffo_example.png", "diffo_example.diffo"
OSDIFF_STREAM = "osdiff_example.diffo"


def one_step(stream: str) -> list[tuple[str, str, dict]]:
    """Your checkpoint + the codec weights → the patched MODEL → one core sampling step → core VAE Decode."""
    return [
        ("checkpoint", "CheckpointLoaderSimple", {}),
        ("codec", "DiffOLoadCodec", {"model": CODEC}),
        ("stream", "DiffOLoadBitstream", {"bitstream_file": stream}),
        ("apply", "DiffOApplyToModel", {"model": Out("checkpoint"), "diffo_codec": Out("codec"),
                                        "bitstream": Out("stream")}),
        ("sampler", "KSamplerSelect", {"sampler_name": "euler"}),
        ("guider", "BasicGuider", {"model": Out("apply"), "conditioning": Out("apply", 1)}),
        ("one_step", "SamplerCustomAdvanced", {"noise": Out("apply", 3), "guider": Out("guider"),
                                               "sampler": Out("sampler"), "sigmas": Out("apply", 4),
                                               "latent_image": Out("apply", 2)}),
        ("vae_decode", "VAEDecode", {"samples": Out("one_step"), "vae": Out("checkpoint", 2)}),
        ("crop", "DiffOCropToOriginal", {"image": Out("vae_decode"), "bitstream": Out("stream")}),
    ]


WORKFLOWS: dict[str, list[tuple[str, str, dict]]] = {
    # Load Image → Encode → Save Bitstream
    "compress": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("model", "DiffOLoadModel", {}),
        ("encode", "DiffOEncode", {"image": Out("image"), "diffo_model": Out("model"), "rate_mode": "target bpp",
                                   "bpp": 0.1}),
        ("save", "DiffOSaveBitstream", {"bitstream": Out("encode"), "filename_prefix": "diffo/compress"}),
    ],
    # Load Bitstream → Decode → Save Image
    "decompress": [
        ("stream", "DiffOLoadBitstream", {"bitstream_file": STREAM}),
        ("model", "DiffOLoadModel", {}),
        ("info", "PreviewAny", {"source": Out("stream", 1)}),
        ("decode", "DiffODecode", {"bitstream": Out("stream"), "diffo_model": Out("model")}),
        ("save", "SaveImage", {"images": Out("decode"), "filename_prefix": "diffo/decompress"}),
    ],
    # DiffO and AVIF at the same size, side by side with their figures
    "roundtrip_compare": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("model", "DiffOLoadModel", {}),
        ("encode", "DiffOEncode", {"image": Out("image"), "diffo_model": Out("model"), "bpp": 0.1}),
        ("decode", "DiffODecode", {"bitstream": Out("encode"), "diffo_model": Out("model")}),
        ("avif", "DiffOClassicalCodec", {"image": Out("image"), "codec": "AVIF", "target_bpp": Out("encode", 2)}),
        ("compare_diffo", "DiffOCompare", {"original": Out("image"), "reconstruction": Out("decode"),
                                           "label": "DiffO", "bitstream": Out("encode")}),
        ("compare_avif", "DiffOCompare", {"original": Out("image"), "reconstruction": Out("avif"),
                                          "label": "AVIF", "bpp": Out("avif", 1)}),
        ("stitch", "ImageStitch", {"image1": Out("compare_diffo", 1), "direction": "down",
                                   "image2": Out("compare_avif", 1)}),
        ("save", "SaveImage", {"images": Out("stitch"), "filename_prefix": "diffo/roundtrip_compare"}),
    ],
    # RD plot: DiffO rate levels against classical codecs at the same sizes
    "rate_sweep": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("model", "DiffOLoadModel", {}),
        ("sweep", "DiffORateSweep", {"image": Out("image"), "diffo_model": Out("model"), "rates": "0, 0.25, 0.5, 1",
                                     "codecs": "avif, jpeg2000, webp, jpeg", "metric": "psnr"}),
        ("plot", "SaveImage", {"images": Out("sweep"), "filename_prefix": "diffo/rate_sweep"}),
        ("table", "PreviewAny", {"source": Out("sweep", 1)}),
    ],
    # The decoder as blocks; the LATENT also goes through a core latent node (Upscale Latent By)
    "decoder_blocks": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("model", "DiffOLoadModel", {}),
        ("encode", "DiffOEncode", {"image": Out("image"), "diffo_model": Out("model"), "rate_mode": "rate level",
                                   "rate": 0.5}),
        ("entropy", "DiffOEntropyDecode", {"bitstream": Out("encode"), "diffo_model": Out("model")}),
        ("control", "DiffOControl", {"coded_latent": Out("entropy"), "diffo_model": Out("model")}),
        ("denoise", "DiffOOneStepDenoise", {"control": Out("control"), "diffo_model": Out("model")}),
        ("to_image", "DiffOLatentToImage", {"latent": Out("denoise"), "diffo_model": Out("model")}),
        ("upscale", "LatentUpscaleBy", {"samples": Out("denoise"), "upscale_method": "bilinear", "scale_by": 1.5}),
        ("to_image_upscaled", "DiffOLatentToImage", {"latent": Out("upscale"), "diffo_model": Out("model")}),
        ("compare", "DiffOCompare", {"original": Out("image"), "reconstruction": Out("to_image"),
                                     "label": "DiffO blocks", "bitstream": Out("encode")}),
        ("save", "SaveImage", {"images": Out("compare", 1), "filename_prefix": "diffo/decoder_blocks"}),
        ("preview_upscaled", "PreviewImage", {"images": Out("to_image_upscaled")}),
    ],
    # Core image nodes around DiffO: scale/crop before encoding, stitch and preview after decoding
    "core_chain": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("scale", "ImageScale", {"image": Out("image"), "upscale_method": "lanczos", "width": 384, "height": 320,
                                 "crop": "center"}),
        ("model", "DiffOLoadModel", {}),
        ("encode", "DiffOEncode", {"image": Out("scale"), "diffo_model": Out("model"), "rate_mode": "max bytes",
                                   "max_bytes": 1500}),
        ("decode", "DiffODecode", {"bitstream": Out("encode"), "diffo_model": Out("model")}),
        ("stitch", "ImageStitch", {"image1": Out("scale"), "image2": Out("decode")}),
        ("preview", "PreviewImage", {"images": Out("stitch")}),
        ("save", "SaveImage", {"images": Out("decode"), "filename_prefix": "diffo/core_chain"}),
    ],
    # OSDiff with your SD 2.1-base checkpoint: its VAE encodes, the codec weights code the latent
    "osdiff_compress_checkpoint": [
        ("image", "LoadImage", {"image": IMAGE}),
        ("checkpoint", "CheckpointLoaderSimple", {}),
        ("codec", "DiffOLoadCodec", {"model": CODEC}),
        ("compress", "DiffOCompressWithVAE", {"image": Out("image"), "vae": Out("checkpoint", 2),
                                              "diffo_codec": Out("codec")}),
        ("save", "DiffOSaveBitstream", {"bitstream": Out("compress"), "filename_prefix": "diffo/osdiff"}),
    ],
    # OSDiff decoded by your checkpoint's UNet (patched) in one core sampling step, and core VAE Decode
    "osdiff_decompress_checkpoint": one_step(OSDIFF_STREAM) + [
        ("save", "SaveImage", {"images": Out("crop"), "filename_prefix": "diffo/osdiff_decompress"}),
    ],
    # ... then the LATENT refined by a core KSampler at low denoise on the unpatched MODEL (add a LoRA before it)
    "osdiff_decode_refine": one_step(OSDIFF_STREAM) + [
        ("prompt", "CLIPTextEncode", {"text": "a sharp, detailed photo", "clip": Out("checkpoint", 1)}),
        ("negative", "CLIPTextEncode", {"text": "blurry", "clip": Out("checkpoint", 1)}),
        ("refine", "KSampler", {"model": Out("checkpoint"), "seed": 0, "steps": 4, "cfg": 4.0,
                                "sampler_name": "euler", "scheduler": "normal", "positive": Out("prompt"),
                                "negative": Out("negative"), "latent_image": Out("one_step"), "denoise": 0.3}),
        ("refine_decode", "VAEDecode", {"samples": Out("refine"), "vae": Out("checkpoint", 2)}),
        ("refine_crop", "DiffOCropToOriginal", {"image": Out("refine_decode"), "bitstream": Out("stream")}),
        ("stitch", "ImageStitch", {"image1": Out("crop"), "image2": Out("refine_crop")}),
        ("save", "SaveImage", {"images": Out("stitch"), "filename_prefix": "diffo/osdiff_refine"}),
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = ap.parse_args(argv)
    classes = load_plugin().NODE_CLASS_MAPPINGS
    stale = []
    for name, spec in WORKFLOWS.items():
        path = ROOT / "workflows" / f"{name}.json"
        text = json.dumps(build(spec, classes), indent=1) + "\n"
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text)
    print(("differ: " if args.check else "wrote: ") + (", ".join(stale) or "nothing"))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
