"""Run in a separate process by test_determinism.py: encode/decode with a given thread count and print
hashes of the stream, the decoded entropy symbols and the decoded pixels as JSON."""

import hashlib
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

threads, model_dir, image_path, stream_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)

from safetensors.torch import load_file  # noqa: E402

from diffo import pipeline  # noqa: E402
from diffo.codec import DiffoCodec  # noqa: E402
from diffo.image import to_uint8  # noqa: E402
from diffo.latent_codec import valid_extent  # noqa: E402


def h(t) -> str:
    return hashlib.sha256(t if isinstance(t, bytes) else t.contiguous().numpy().tobytes()).hexdigest()[:16]


model = DiffoCodec.from_pretrained(model_dir)
img = load_file(image_path)["image"]
data = pipeline.encode(model, img, rate=0.6, seed=7)
foreign = open(stream_path, "rb").read()
result = {"threads": torch.get_num_threads(), "stream": h(data)}
for name, stream in (("own", data), ("foreign", foreign)):
    bs = pipeline.read_header(stream)
    lc = model.latent_codec
    lh, lw = pipeline.padded_latent_shape(model, bs.height, bs.width)
    valid = pipeline.latent_valid(bs.height, bs.width)
    idx = lc.base.decompress([bs.streams[0]], valid_extent(valid, 4), (lh // 4, lw // 4))
    y_hat = lc.residual.decompress([bs.streams[1]], [bs.streams[2]], lc.base.quantizer.embed(idx), bs.rate_q, valid)
    pixels = to_uint8(pipeline.decode(model, stream))
    batch = [to_uint8(x) for x in pipeline.decode_batch(model, [stream] * 4)]
    result[name] = {"indices": h(idx), "y_hat": h(y_hat), "pixels": h(pixels),
                    "batch_equal": all(torch.equal(b, pixels) for b in batch)}
print(json.dumps(result))
