#!/usr/bin/env python
"""Convert a Hub-layout PaliGemma 1/2 checkpoint folder into a big_vision `.npz` checkpoint.

    python tools/convert_hub_to_npz.py tests/fixtures/models/pg1-56 out/pg1-56.npz --params-prefix
    python tools/convert_hub_to_npz.py tests/fixtures/models/pg2-42 out/pg2-42.npz --sidecar-config
    python tools/convert_hub_to_npz.py tests/fixtures/models/pg1-56 out/pg1-56.bf16.npz --bf16

This is the inverse of transformers' `convert_paligemma_weights_to_hf.py` /
`convert_paligemma2_weights_to_hf.py`: Hub tensors (`[out, in]` Linear weights, OIHW conv, one
tensor per layer) become big_vision's Flax tree (`[in, out]` kernels, HWIO conv, einsum-shaped
attention, every per-layer tensor stacked on a leading depth axis), written as `np.savez`
does (stored members, ZIP64 extra fields; fixed timestamps) under `img/...` and `llm/...`, optionally below `params/` as the
released files are. The embedding table loses the rows the Hub converter appended (`<image>`
and padding, ids >= image_token_index) unless --keep-vocab-rows is given: big_vision's table
has only the trained tokens.

--bf16 stores every tensor as bf16 in NumPy's 2-byte void (`V2`), the way big_vision writes
`ml_dtypes.bfloat16` (f32 values are rounded to nearest even, as torch's `.to(bfloat16)`).
bf16 tensors of the input stay bf16 bit for bit.

tokenizer.json is copied beside the output. --sidecar-config also copies config.json,
generation_config.json and preprocessor_config.json as `<stem>.<name>`: the Rust loader then
takes the values tensor shapes cannot tell (e.g. `query_pre_attn_scalar`) from there.

--format-fixture OUT writes instead the small archive of assorted dtypes and layouts that the
`.npz` reader tests use (tests/fixtures/big_vision/format.npz); see its docstring.

Needs numpy and safetensors only (the safetensors files are parsed by hand so bf16 needs no torch).
"""
import argparse
import json
import os
import shutil
import struct
import sys
import zipfile

import numpy as np

# ------------------------------------------------------------------------------------------------
# Reading the Hub folder
# ------------------------------------------------------------------------------------------------

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def read_safetensors(path):
    """{name: (array, is_bf16)}; bf16 tensors come back as their uint16 bit patterns."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        if dtype not in ST_DTYPES:
            sys.exit(f"{path}: tensor {name} has unsupported dtype {dtype}")
        start, end = info["data_offsets"]
        buf = data[8 + n + start:8 + n + end]
        arr = np.frombuffer(buf, dtype=np.dtype(ST_DTYPES[dtype]).newbyteorder("<"))
        out[name] = (arr.reshape(info["shape"]).copy(), dtype == "BF16")
    return out


def canonical_name(name):
    """Hub names whatever layout saved them (mirrors src/weights.rs::canonical_name)."""
    if name.endswith("lm_head.weight"):
        return None
    for wrapped in ("language_model.", "vision_tower.", "multi_modal_projector."):
        if name.startswith("model." + wrapped):
            name = name[len("model."):]
            if wrapped == "language_model.":
                name = "language_model.model." + name[len("language_model."):]
            break
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def read_hub_folder(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file in files:
        for name, value in read_safetensors(os.path.join(folder, file)).items():
            canonical = canonical_name(name)
            if canonical is not None:
                tensors[canonical] = value
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return tensors, config


# ------------------------------------------------------------------------------------------------
# bf16 handling: every array is kept as (values, is_bf16) until written
# ------------------------------------------------------------------------------------------------

def f32_to_bf16_bits(x):
    """Round-to-nearest-even f32 -> bf16 bit patterns (torch's rounding; NaN kept quiet)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)


def finish(arr, is_bf16, want_bf16):
    """The array as written: bf16 as 2-byte void, others in their own dtype."""
    if is_bf16:
        return np.ascontiguousarray(arr).view("V2")
    if want_bf16:
        return f32_to_bf16_bits(arr.astype(np.float32)).view("V2")
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------------
# Hub -> big_vision
# ------------------------------------------------------------------------------------------------

def text_sizes(config):
    t = config.get("text_config", {})
    gemma2 = t.get("model_type", "gemma") == "gemma2"
    hidden = t.get("hidden_size", 2304 if gemma2 else 3072)
    heads = t.get("num_attention_heads", 8 if gemma2 else 16)
    kv = t.get("num_key_value_heads", 4 if gemma2 else 16)
    head_dim = t.get("head_dim", 256)
    layers = t.get("num_hidden_layers", 26 if gemma2 else 28)
    return gemma2, hidden, heads, kv, head_dim, layers


def convert(tensors, config, keep_vocab_rows):
    """{big_vision path: (array, is_bf16)} from Hub tensors."""
    out = {}
    get = lambda name: tensors.pop(name)  # every tensor must be used exactly once

    def stack(names):
        parts = [get(n) for n in names]
        return np.stack([p[0] for p in parts]), parts[0][1]

    vt = "vision_tower.vision_model."
    kernel, bf = get(vt + "embeddings.patch_embedding.weight")
    out["img/embedding/kernel"] = (kernel.transpose(2, 3, 1, 0), bf)  # OIHW -> HWIO
    out["img/embedding/bias"] = get(vt + "embeddings.patch_embedding.bias")
    pos, bf = get(vt + "embeddings.position_embedding.weight")
    out["img/pos_embedding"] = (pos[None], bf)
    v_layers = sum(1 for k in tensors if k.startswith(vt + "encoder.layers.") and k.endswith(".layer_norm1.weight"))
    v_heads = config["vision_config"].get("num_attention_heads", 12)
    width = pos.shape[1]
    blk = "img/Transformer/encoderblock/"
    layer = lambda s: [f"{vt}encoder.layers.{i}.{s}" for i in range(v_layers)]
    for src, dst in [("layer_norm1.weight", "LayerNorm_0/scale"), ("layer_norm1.bias", "LayerNorm_0/bias"),
                     ("layer_norm2.weight", "LayerNorm_1/scale"), ("layer_norm2.bias", "LayerNorm_1/bias"),
                     ("self_attn.out_proj.bias", "MultiHeadDotProductAttention_0/out/bias"),
                     ("mlp.fc1.bias", "MlpBlock_0/Dense_0/bias"), ("mlp.fc2.bias", "MlpBlock_0/Dense_1/bias")]:
        out[blk + dst] = stack(layer(src))
    hd = width // v_heads
    for src, dst in [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")]:
        w, bf = stack(layer(f"self_attn.{src}.weight"))          # [L, out, in]
        out[blk + f"MultiHeadDotProductAttention_0/{dst}/kernel"] = (
            w.transpose(0, 2, 1).reshape(v_layers, width, v_heads, hd), bf)
        b, bf = stack(layer(f"self_attn.{src}.bias"))
        out[blk + f"MultiHeadDotProductAttention_0/{dst}/bias"] = (b.reshape(v_layers, v_heads, hd), bf)
    w, bf = stack(layer("self_attn.out_proj.weight"))
    out[blk + "MultiHeadDotProductAttention_0/out/kernel"] = (
        w.transpose(0, 2, 1).reshape(v_layers, v_heads, hd, width), bf)
    for src, dst in [("mlp.fc1.weight", "MlpBlock_0/Dense_0/kernel"), ("mlp.fc2.weight", "MlpBlock_0/Dense_1/kernel")]:
        w, bf = stack(layer(src))
        out[blk + dst] = (w.transpose(0, 2, 1), bf)
    out["img/Transformer/encoder_norm/scale"] = get(vt + "post_layernorm.weight")
    out["img/Transformer/encoder_norm/bias"] = get(vt + "post_layernorm.bias")
    w, bf = get("multi_modal_projector.linear.weight")
    out["img/head/kernel"] = (w.T, bf)
    out["img/head/bias"] = get("multi_modal_projector.linear.bias")

    gemma2, hidden, heads, kv, head_dim, layers = text_sizes(config)
    lm = "language_model.model."
    emb, bf = get(lm + "embed_tokens.weight")
    image_token = config.get("image_token_index", 256000)
    if not keep_vocab_rows and image_token < emb.shape[0]:
        emb = emb[:image_token]  # drop `<image>` and the padding the Hub converter appended
    out["llm/embedder/input_embedding"] = (emb, bf)
    out["llm/final_norm/scale"] = get(lm + "norm.weight")
    layer = lambda s: [f"{lm}layers.{i}.{s}" for i in range(layers)]

    def heads_of(name, n):
        # [n*H, D] ([out, in]) -> [n, D, H] per layer
        w, bf = stack(layer(name))
        return w.reshape(layers, n, head_dim, hidden).transpose(0, 1, 3, 2), bf

    q, bf = heads_of("self_attn.q_proj.weight", heads)
    k, _ = heads_of("self_attn.k_proj.weight", kv)
    v, _ = heads_of("self_attn.v_proj.weight", kv)
    if kv == heads:
        # big_vision's Gemma uses one fused einsum for plain multi-head attention.
        out["llm/layers/attn/qkv_einsum/w"] = (np.stack([q, k, v], axis=1), bf)
    else:
        out["llm/layers/attn/q_einsum/w"] = (q, bf)
        out["llm/layers/attn/kv_einsum/w"] = (np.stack([k, v], axis=1), bf)
    o, bf = stack(layer("self_attn.o_proj.weight"))              # [L, D, N*H]
    out["llm/layers/attn/attn_vec_einsum/w"] = (
        o.transpose(0, 2, 1).reshape(layers, heads, head_dim, hidden), bf)
    gate, bf = stack(layer("mlp.gate_proj.weight"))              # [L, F, D]
    up, _ = stack(layer("mlp.up_proj.weight"))
    out["llm/layers/mlp/gating_einsum"] = (np.stack([gate, up], axis=1).transpose(0, 1, 3, 2), bf)
    down, bf = stack(layer("mlp.down_proj.weight"))              # [L, D, F]
    out["llm/layers/mlp/linear"] = (down.transpose(0, 2, 1), bf)
    norms = [("input_layernorm", "pre_attention_norm")]
    if gemma2:
        norms += [("post_attention_layernorm", "post_attention_norm"),
                  ("pre_feedforward_layernorm", "pre_ffw_norm"),
                  ("post_feedforward_layernorm", "post_ffw_norm")]
    else:
        # Gemma 1's second norm (before the MLP) is called post_attention_layernorm on the Hub.
        norms += [("post_attention_layernorm", "pre_ffw_norm")]
    for src, dst in norms:
        out[f"llm/layers/{dst}/scale"] = stack(layer(src + ".weight"))
    if tensors:
        sys.exit(f"unconverted tensors left: {sorted(tensors)[:10]}")
    return out


def write_npz(path, arrays, params_prefix, want_bf16):
    prefix = "params/" if params_prefix else ""
    named = {prefix + k: finish(v, bf, want_bf16) for k, (v, bf) in arrays.items()}
    # What np.savez does (stored members, ZIP64 extra fields), with a fixed timestamp so that
    # a rerun writes identical bytes.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in named.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)


def copy_beside(folder, out, sidecar_config):
    out_dir = os.path.dirname(os.path.abspath(out))
    shutil.copyfile(os.path.join(folder, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    if sidecar_config:
        stem = os.path.splitext(os.path.basename(out))[0]
        for name in ("config.json", "generation_config.json", "preprocessor_config.json"):
            src = os.path.join(folder, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, f"{stem}.{name}"))


# ------------------------------------------------------------------------------------------------
# Reader test fixture
# ------------------------------------------------------------------------------------------------

def write_format_fixture(path):
    """Small archive exercising the reader: every dtype, Fortran order, big-endian, bf16 (`V2`),
    a deflated member, a 0-d and an empty array, `.npy` v2 headers, and full ZIP64 structures
    (ZIP64 extra fields and the ZIP64 end-of-central-directory record, forced on a tiny file by
    lowering zipfile's ZIP64 threshold). Values are small integers so every dtype holds them."""
    base = np.arange(24, dtype=np.float64).reshape(2, 3, 4) - 5.0
    arrays = {
        "f32": base.astype("<f4"),
        "f64": base.astype("<f8"),
        "f16": base.astype("<f2"),
        "bf16": f32_to_bf16_bits(base.astype(np.float32)).view("V2"),
        "i32": base.astype("<i4"),
        "i64": base.astype("<i8"),
        "u8": (base + 5).astype("u1"),
        "bool": (base > 0),
        "f32_fortran": np.asfortranarray(base.astype("<f4")),
        "f32_big_endian": base.astype(">f4"),
        "scalar": np.array(7.5, dtype="<f4"),
        "empty": np.zeros((0, 3), dtype="<f4"),
        "nested/path/name": base.astype("<f4"),
    }
    deflated = {"deflated"}
    v2_header = {"f64"}
    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = 1  # every offset is now "large": forces the ZIP64 records
    try:
        with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
            for name, arr in list(arrays.items()) + [("deflated", base.astype("<f4"))]:
                method = zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED
                info = zipfile.ZipInfo(name + ".npy", date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = method
                with zf.open(info, "w", force_zip64=True) as f:
                    version = (2, 0) if name in v2_header else None
                    np.lib.format.write_array(f, arr, version=version, allow_pickle=False)
    finally:
        zipfile.ZIP64_LIMIT = limit


# ------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="Hub-layout checkpoint folder")
    ap.add_argument("out", nargs="?", help="output .npz")
    ap.add_argument("--params-prefix", action="store_true", help="put the tree under params/ (as released files)")
    ap.add_argument("--bf16", action="store_true", help="store tensors as bf16 (2-byte void V2)")
    ap.add_argument("--keep-vocab-rows", action="store_true",
                    help="keep embedding rows >= image_token_index (the Hub's <image> and padding rows)")
    ap.add_argument("--sidecar-config", action="store_true",
                    help="copy config.json etc. beside the output as <stem>.config.json etc.")
    ap.add_argument("--format-fixture", metavar="OUT", help="write the .npz reader test archive and exit")
    args = ap.parse_args()
    if args.format_fixture:
        write_format_fixture(args.format_fixture)
        return
    if not args.folder or not args.out:
        ap.error("folder and out are required")
    tensors, config = read_hub_folder(args.folder)
    arrays = convert(tensors, config, args.keep_vocab_rows)
    write_npz(args.out, arrays, args.params_prefix, args.bf16)
    copy_beside(args.folder, args.out, args.sidecar_config)
    print(f"wrote {args.out}: {len(arrays)} arrays, {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
