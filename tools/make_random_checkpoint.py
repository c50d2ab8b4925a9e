#!/usr/bin/env python
"""Write a random PaliGemma checkpoint with the REAL shapes of a released model, for benchmarks.

    python tools/make_random_checkpoint.py --variant pg1-3b-224 --dtype bf16 --out /tmp/pg1-3b-224
    python tools/make_random_checkpoint.py --variant pg2-3b-224 --dtype bf16 --out /tmp/pg2 --verify

Never commit the output (about 6 GB in bf16 for 3B).  Only numpy is needed to write it: tensors are
generated in chunks and streamed into hand-written safetensors shards (<= 2 GB each, a tensor larger
than that gets a shard of its own), so memory stays far below 1 GB.  The folder looks like a Hub
download: config.json (the Hub's style, reference doc sections 4.1/4.2), generation_config.json,
preprocessor_config.json, tokenizer.json (PaliGemma's real tokenizer), tokenizer_config.json,
model-XXXXX-of-YYYYY.safetensors and model.safetensors.index.json.  Keys are in the Hub layout:
vision_tower.vision_model.*, multi_modal_projector.linear.*, language_model.model.*; no lm_head (tied).

Values: matrices, embeddings and the conv kernel ~ N(0, 0.02^2); Gemma RMSNorm weights (stored
zero-centred, applied as 1 + w) ~ N(0, 0.02^2); SigLIP LayerNorm weights 1 + N(0, 0.02^2); biases
~ N(0, 0.002^2).  Activations stay finite in bf16 through every layer.  Each tensor has its own
generator seeded with (seed, tensor index), so the output does not depend on the sharding.

bf16 is written as real safetensors "BF16": float32 -> upper 16 bits with round-to-nearest-even,
the same rounding as torch's .to(torch.bfloat16).

--verify (needs torch + transformers) checks the key set and shapes against a transformers model
instantiated on the meta device from the written config.json, loads one tensor back with torch, and
checks the bf16 rounding against torch; --verify-load additionally runs
PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=bfloat16) (needs ~2 bytes/param of RAM).
"""
import argparse
import json
import os
import shutil
import struct
import sys
import time

import numpy as np

# ------------------------------------------------------------------------------------------------
# Released model shapes (shared/research/transformers-reference.md sections 3.4, 3.5, 4.1-4.3)
# ------------------------------------------------------------------------------------------------

VOCAB = 257216          # 256000 Gemma + 1024 <loc> + 128 <seg> + <image> + 63 padding rows
IMAGE_TOKEN = 257152
PATCH = 14
SIGLIP = dict(hidden=1152, layers=27, heads=16, mlp=4304)        # So400m/14, for every PaliGemma

TEXT = {
    # family, size: hidden, layers, heads, kv_heads, head_dim, mlp, query_pre_attn_scalar
    ("pg1", "3b"): dict(hidden=2048, layers=18, heads=8, kv=1, head_dim=256, mlp=16384, qpas=None),
    ("pg2", "3b"): dict(hidden=2304, layers=26, heads=8, kv=4, head_dim=256, mlp=9216, qpas=256),
    ("pg2", "10b"): dict(hidden=3584, layers=42, heads=16, kv=8, head_dim=256, mlp=14336, qpas=256),
    ("pg2", "28b"): dict(hidden=4608, layers=46, heads=32, kv=16, head_dim=128, mlp=36864, qpas=144),
}
RESOLUTIONS = (224, 448, 896)
# PG2 vision_config carries a meaningless `num_positions` that depends on the model size, not the
# resolution (reference section 4.2); written for realism, to be ignored by loaders.
PG2_BOGUS_NUM_POSITIONS = {"3b": 256, "10b": 1024, "28b": 4096}

VARIANTS = [f"{fam}-{size}-{res}" for (fam, size) in TEXT for res in RESOLUTIONS
            if not (fam == "pg1" and size != "3b")]

MATRIX_STD = 0.02
NORM_STD = 0.02
BIAS_STD = 0.002
MAX_SHARD_BYTES = 2_000_000_000   # 2 GB; a larger tensor gets a shard of its own
CHUNK = 4 * 1024 * 1024          # values generated per numpy call (16 MB of float32)


def parse_variant(v):
    fam, size, res = v.split("-")
    return fam, size, int(res)


# ------------------------------------------------------------------------------------------------
# Tensor list in the Hub layout
# ------------------------------------------------------------------------------------------------

def tensor_specs(fam, size, res):
    """[(name, shape, kind)] with kind in {"matrix", "bias", "ln_weight", "rms_weight"}."""
    t = TEXT[(fam, size)]
    H, V = t["hidden"], SIGLIP["hidden"]
    n_pos = (res // PATCH) ** 2
    out = []
    vp = "vision_tower.vision_model."
    out += [(vp + "embeddings.patch_embedding.weight", (V, 3, PATCH, PATCH), "matrix"),
            (vp + "embeddings.patch_embedding.bias", (V,), "bias"),
            (vp + "embeddings.position_embedding.weight", (n_pos, V), "matrix")]
    for i in range(SIGLIP["layers"]):
        p = f"{vp}encoder.layers.{i}."
        out += [(p + "layer_norm1.weight", (V,), "ln_weight"), (p + "layer_norm1.bias", (V,), "bias")]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(p + f"self_attn.{proj}.weight", (V, V), "matrix"), (p + f"self_attn.{proj}.bias", (V,), "bias")]
        out += [(p + "layer_norm2.weight", (V,), "ln_weight"), (p + "layer_norm2.bias", (V,), "bias"),
                (p + "mlp.fc1.weight", (SIGLIP["mlp"], V), "matrix"), (p + "mlp.fc1.bias", (SIGLIP["mlp"],), "bias"),
                (p + "mlp.fc2.weight", (V, SIGLIP["mlp"]), "matrix"), (p + "mlp.fc2.bias", (V,), "bias")]
    out += [(vp + "post_layernorm.weight", (V,), "ln_weight"), (vp + "post_layernorm.bias", (V,), "bias")]
    out += [("multi_modal_projector.linear.weight", (H, V), "matrix"),
            ("multi_modal_projector.linear.bias", (H,), "bias")]
    lp = "language_model.model."
    out += [(lp + "embed_tokens.weight", (VOCAB, H), "matrix")]
    q, kv = t["heads"] * t["head_dim"], t["kv"] * t["head_dim"]
    for i in range(t["layers"]):
        p = f"{lp}layers.{i}."
        out += [(p + "input_layernorm.weight", (H,), "rms_weight"),
                (p + "self_attn.q_proj.weight", (q, H), "matrix"),
                (p + "self_attn.k_proj.weight", (kv, H), "matrix"),
                (p + "self_attn.v_proj.weight", (kv, H), "matrix"),
                (p + "self_attn.o_proj.weight", (H, q), "matrix"),
                (p + "post_attention_layernorm.weight", (H,), "rms_weight")]
        if fam == "pg2":
            out += [(p + "pre_feedforward_layernorm.weight", (H,), "rms_weight"),
                    (p + "post_feedforward_layernorm.weight", (H,), "rms_weight")]
        out += [(p + "mlp.gate_proj.weight", (t["mlp"], H), "matrix"),
                (p + "mlp.up_proj.weight", (t["mlp"], H), "matrix"),
                (p + "mlp.down_proj.weight", (H, t["mlp"]), "matrix")]
    out += [(lp + "norm.weight", (H,), "rms_weight")]
    return out


# ------------------------------------------------------------------------------------------------
# Values and encoding
# ------------------------------------------------------------------------------------------------

def f32_to_bf16_bits(x):
    """float32 array -> uint16 bfloat16 bit patterns, round-to-nearest-even (finite inputs).
    Modifies x in place (it is scratch)."""
    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    u += r
    u >>= 16
    return u.astype(np.uint16)


def generate_chunks(kind, n, rng):
    """Yield float32 chunks of the n values of one tensor."""
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        x = rng.standard_normal(m, dtype=np.float32)
        if kind == "matrix":
            x *= MATRIX_STD
        elif kind == "bias":
            x *= BIAS_STD
        elif kind == "rms_weight":       # applied as (1 + w)
            x *= NORM_STD
        elif kind == "ln_weight":
            x *= NORM_STD
            x += 1.0
        else:
            raise ValueError(kind)
        yield x


def write_safetensors(path, items, dtype, seed, index_of):
    """Stream one shard: header first (all offsets are known from the shapes), then each tensor's
    chunks.  items: [(name, shape, kind)] in file order."""
    esize = 2 if dtype == "bf16" else 4
    st_dtype = "BF16" if dtype == "bf16" else "F32"
    header, off = {}, 0
    for name, shape, _ in items:
        nbytes = int(np.prod(shape)) * esize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)          # data start aligned to 8 bytes, like safetensors
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in items:
            rng = np.random.default_rng([seed, index_of[name]])
            for x in generate_chunks(kind, int(np.prod(shape)), rng):
                f.write((f32_to_bf16_bits(x) if dtype == "bf16" else x).tobytes())
    return off


def plan_shards(specs, esize):
    shards, cur, cur_bytes = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1])) * esize
        if cur and cur_bytes + nbytes > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(spec)
        cur_bytes += nbytes
    if cur:
        shards.append(cur)
    return shards


# ------------------------------------------------------------------------------------------------
# Config files
# ------------------------------------------------------------------------------------------------

def config_json(fam, size, res, dtype):
    t = TEXT[(fam, size)]
    n = (res // PATCH) ** 2
    torch_dtype = "bfloat16" if dtype == "bf16" else "float32"
    vision = {"hidden_size": SIGLIP["hidden"], "intermediate_size": SIGLIP["mlp"],
              "model_type": "siglip_vision_model", "num_attention_heads": SIGLIP["heads"],
              "num_hidden_layers": SIGLIP["layers"], "num_image_tokens": n, "patch_size": PATCH,
              "projection_dim": t["hidden"], "projector_hidden_act": "gelu_fast", "vision_use_head": False}
    if res != 224:
        vision["image_size"] = res        # the 224 Hub configs rely on the SigLIP default
    if fam == "pg1":
        # google/paligemma-3b-*: only non-default Gemma fields are listed
        text = {"hidden_size": t["hidden"], "intermediate_size": t["mlp"], "model_type": "gemma",
                "num_attention_heads": t["heads"], "num_hidden_layers": t["layers"], "num_image_tokens": n,
                "num_key_value_heads": t["kv"], "torch_dtype": torch_dtype, "vocab_size": VOCAB}
        top = {"hidden_size": 2048}
    else:
        # google/paligemma2-*: text_config = gemma-2-2b-it config + size overrides
        text = {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
                "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": t["head_dim"],
                "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                "hidden_size": t["hidden"], "initializer_range": 0.02, "intermediate_size": t["mlp"],
                "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": t["heads"],
                "num_hidden_layers": t["layers"], "num_image_tokens": n, "num_key_value_heads": t["kv"],
                "pad_token_id": 0, "query_pre_attn_scalar": t["qpas"], "rms_norm_eps": 1e-06,
                "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": torch_dtype, "use_cache": True,
                "vocab_size": VOCAB}
        vision["num_positions"] = PG2_BOGUS_NUM_POSITIONS[size]
        vision["torch_dtype"] = torch_dtype
        top = {"hidden_size": 2048, "num_hidden_layers": t["layers"]}
    return {"architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
            **top, "ignore_index": -100, "image_token_index": IMAGE_TOKEN, "model_type": "paligemma",
            "pad_token_id": 0, "projection_dim": t["hidden"], "text_config": text, "torch_dtype": torch_dtype,
            "vision_config": vision}


def preprocessor_config_json(res):
    return {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
            "image_seq_length": (res // PATCH) ** 2, "image_std": [0.5, 0.5, 0.5],
            "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
            "size": {"height": res, "width": res}}


def tokenizer_config_json():
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
            "extra_special_tokens": ["<image>"], "model_max_length": 1000000000000000019884624838656,
            "processor_class": "PaliGemmaProcessor", "tokenizer_class": "GemmaTokenizer"}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------------------
# Verification (torch + transformers, optional)
# ------------------------------------------------------------------------------------------------

def hub_to_memory_key(k):
    """Hub checkpoint key -> transformers 5.x in-memory state_dict key."""
    if k.startswith("vision_tower.vision_model."):
        return "model.vision_tower." + k[len("vision_tower.vision_model."):]
    if k.startswith("multi_modal_projector."):
        return "model." + k
    if k.startswith("language_model.model."):
        return "model.language_model." + k[len("language_model.model."):]
    raise KeyError(k)


def verify(out, dtype, load):
    import torch
    from safetensors import safe_open
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    on_disk = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(os.path.join(out, fname), "pt") as f:
            for k in f.keys():
                on_disk[k] = tuple(f.get_slice(k).get_shape())
                assert index["weight_map"][k] == fname
    assert set(on_disk) == set(index["weight_map"])

    cfg = PaliGemmaConfig.from_pretrained(out)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    got = {hub_to_memory_key(k): s for k, s in on_disk.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    bad = [k for k in expected if expected[k] != got[k]]
    assert not bad, [(k, expected[k], got[k]) for k in bad[:5]]
    print(f"verify: {len(got)} tensors; key set and shapes equal those of the meta-device transformers model")

    # one tensor back through torch: dtype, statistics
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    with safe_open(os.path.join(out, index["weight_map"][name]), "pt") as f:
        w = f.get_tensor(name)
    assert w.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32), w.dtype
    assert torch.isfinite(w.float()).all()
    std = w.float().std().item()
    assert abs(std - MATRIX_STD) < 0.001, std
    print(f"verify: {name} loads through torch as {w.dtype}, std {std:.5f}")

    # the bf16 rounding equals torch's round-to-nearest-even, including exact ties
    x = np.random.default_rng(0).standard_normal(1 << 20, dtype=np.float32)
    ties = (np.arange(4096, dtype=np.uint32) << 16 | 0x8000).view(np.float32)   # exact halfway cases
    x = np.concatenate([x, ties[np.isfinite(ties)], np.float32([0.0, -0.0, 1e-40, 3.0e38])])
    mine = f32_to_bf16_bits(x.copy())
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(mine, ref)
    print("verify: f32 -> bf16 rounding matches torch bit for bit")

    if load:
        t0 = time.time()
        m = PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16)
        n = sum(p.numel() for p in m.parameters())
        assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
        print(f"verify: from_pretrained(bf16) loaded {n / 1e9:.3f}B params in {time.time() - t0:.0f}s")


# ------------------------------------------------------------------------------------------------

def default_tokenizer_path():
    """The repository's copy if there is one, else ../shared's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for p in (os.path.join(root, "tests", "data", "paligemma-tokenizer.json"),
              os.path.join(root, "..", "shared", "tokenizer", "paligemma-tokenizer.json")):
        if os.path.exists(p):
            return os.path.normpath(p)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--variant", required=True, choices=VARIANTS)
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=default_tokenizer_path(),
                    help="PaliGemma tokenizer.json to copy (default: tests/data/ or ../shared/tokenizer/)")
    ap.add_argument("--verify", action="store_true", help="check keys/shapes with transformers (meta device)")
    ap.add_argument("--verify-load", action="store_true", help="also from_pretrained(dtype=bfloat16)")
    args = ap.parse_args()
    if not args.tokenizer or not os.path.exists(args.tokenizer):
        ap.error("no PaliGemma tokenizer.json found; pass --tokenizer")

    fam, size, res = parse_variant(args.variant)
    os.makedirs(args.out, exist_ok=True)
    specs = tensor_specs(fam, size, res)
    index_of = {name: i for i, (name, _, _) in enumerate(specs)}
    esize = 2 if args.dtype == "bf16" else 4
    shards = plan_shards(specs, esize)
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)
    print(f"{args.variant}: {n_params / 1e9:.3f}B params, {len(specs)} tensors, {len(shards)} shards, {args.dtype}")

    t0 = time.time()
    weight_map, total = {}, 0
    for i, items in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(args.out, fname), items, args.dtype, args.seed, index_of)
        weight_map.update({name: fname for name, _, _ in items})
        print(f"  {fname}: {len(items)} tensors, {time.time() - t0:.0f}s")
    write_json(os.path.join(args.out, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(os.path.join(args.out, "config.json"), config_json(fam, size, res, args.dtype))
    write_json(os.path.join(args.out, "generation_config.json"),
               {"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    write_json(os.path.join(args.out, "preprocessor_config.json"), preprocessor_config_json(res))
    write_json(os.path.join(args.out, "tokenizer_config.json"), tokenizer_config_json())
    shutil.copyfile(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    print(f"wrote {args.out} ({total / 1e9:.2f} GB of weights) in {time.time() - t0:.0f}s")

    if args.verify or args.verify_load:
        verify(args.out, args.dtype, args.verify_load)


if __name__ == "__main__":
    sys.exit(main())
