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
from diffo.models.diffo.codec import DiffoCodec  # noqa: E402
from diffo.tools.matrix import decoded_symbols  # noqa: E402

model = DiffoCodec.from_pretrained(model_dir)
img = load_file(image_path)["image"]
data = pipeline.encode(model, img, rate=0.6, seed=7)
foreign = open(stream_path, "rb").read()
result = {"threads": torch.get_num_threads(), "stream": hashlib.sha256(data).hexdigest()[:16]}
for name, stream in (("own", data), ("foreign", foreign)):
    result[name] = decoded_symbols(model, stream)
print(json.dumps(result))
