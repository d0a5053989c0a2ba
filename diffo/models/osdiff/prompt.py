"""SD 2.x's empty-prompt embedding, computed once at conversion from the text encoder in the user's base
checkpoint: OpenCLIP ViT-H/14's text transformer, penultimate layer, then its final LayerNorm (what SD 2.x and
OSDiff condition on). The run time stores the resulting [1, 77, 1024] tensor and needs no text encoder.

Reads either layout: the original single-file checkpoint (`cond_stage_model.model.*`, OpenCLIP names) or a
diffusers `text_encoder` (transformers' CLIPTextModel names, already cut to the penultimate layer).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

# The empty string through OpenCLIP's tokenizer: start, end, then zero padding (SD 2's diffusers tokenizer pads
# with "!", also id 0).
START, END, CONTEXT = 49406, 49407, 77


def empty_prompt_tokens() -> torch.Tensor:
    return torch.tensor([START, END] + [0] * (CONTEXT - 2))


def _layers_openclip(state: dict, prefix: str) -> tuple[dict, list[dict], dict]:
    n = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k)))
    emb = {"token": state[prefix + "token_embedding.weight"], "position": state[prefix + "positional_embedding"]}
    layers = []
    for i in range(n - 1):  # the penultimate layer's output
        p = f"{prefix}transformer.resblocks.{i}."
        layers.append({"ln1": (state[p + "ln_1.weight"], state[p + "ln_1.bias"]),
                       "qkv": (state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"]),
                       "out": (state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"]),
                       "ln2": (state[p + "ln_2.weight"], state[p + "ln_2.bias"]),
                       "fc1": (state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]),
                       "fc2": (state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])})
    return emb, layers, {"ln": (state[prefix + "ln_final.weight"], state[prefix + "ln_final.bias"])}


def _layers_transformers(state: dict) -> tuple[dict, list[dict], dict]:
    pre = "text_model."
    n = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    emb = {"token": state[pre + "embeddings.token_embedding.weight"],
           "position": state[pre + "embeddings.position_embedding.weight"]}
    layers = []
    for i in range(n):  # diffusers' SD 2 text encoder already stops at the penultimate layer
        p = f"{pre}encoder.layers.{i}."
        qkv_w = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        qkv_b = torch.cat([state[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        layers.append({"ln1": (state[p + "layer_norm1.weight"], state[p + "layer_norm1.bias"]),
                       "qkv": (qkv_w, qkv_b),
                       "out": (state[p + "self_attn.out_proj.weight"], state[p + "self_attn.out_proj.bias"]),
                       "ln2": (state[p + "layer_norm2.weight"], state[p + "layer_norm2.bias"]),
                       "fc1": (state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]),
                       "fc2": (state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])})
    return emb, layers, {"ln": (state[pre + "final_layer_norm.weight"], state[pre + "final_layer_norm.bias"])}


@torch.no_grad()
def empty_prompt_embedding(state: dict, prefix: str = "cond_stage_model.model.") -> torch.Tensor:
    """[1, 77, width] from a text encoder's tensors (either layout, see the module docstring)."""
    if prefix + "token_embedding.weight" in state:
        emb, layers, final = _layers_openclip(state, prefix)
    elif "text_model.embeddings.token_embedding.weight" in state:
        emb, layers, final = _layers_transformers(state)
    else:
        raise KeyError("no text encoder found (expected cond_stage_model.model.* or a diffusers text_encoder)")
    f32 = {k: v.float() for k, v in emb.items()}
    x = (f32["token"][empty_prompt_tokens()] + f32["position"][:CONTEXT])[None]
    width = x.shape[-1]
    heads = max(1, width // 64)  # OpenCLIP and CLIP text towers use 64-wide heads (ViT-H/14: 16 heads)
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for layer in layers:
        w = {k: tuple(t.float() for t in v) for k, v in layer.items()}
        h = F.layer_norm(x, (width,), *w["ln1"])
        q, k, v = F.linear(h, *w["qkv"]).chunk(3, -1)
        q, k, v = (t.view(1, CONTEXT, heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal).transpose(1, 2).reshape(1, CONTEXT, width)
        x = x + F.linear(a, *w["out"])
        h = F.layer_norm(x, (width,), *w["ln2"])
        x = x + F.linear(F.gelu(F.linear(h, *w["fc1"])), *w["fc2"])
    return F.layer_norm(x, (width,), *(t.float() for t in final["ln"]))
