#!/usr/bin/env python3
"""Writes the segmentation fixtures under tests/fixtures/segmentation/.

Three references, each computed with the library the Rust code must agree with:

* the mask VQ-VAE decoder (``src/vqvae.rs``): a random VAE saved exactly like big_vision's
  ``vae-oid.npz`` (flat PyTorch state_dict keys, PyTorch layouts, f32), decoded by a PyTorch
  model with the real layer configuration (nn.Conv2d / nn.ConvTranspose2d). The same result is
  also recomputed the way big_vision's flax decoder does it (transposed kernels, input dilated
  by 2 and padded by 2, spatially flipped kernel) to show the two formulations agree;
* pasting a 64x64 decoder output into its box (``src/mask.rs``): big_vision's segmentation
  evaluator line for line (bins / 1023, ``int()`` truncation, Pillow "F" mode BILINEAR resize
  of the raw float mask, ``> 0.0``) on Pillow 13.0.0;
* COCO RLE (``src/mask.rs``): pycocotools' ``mask.encode`` (compressed counts strings).

Run from the repository root:

    venv/bin/python tools/make_segmentation_fixtures.py

Everything is derived from fixed seeds, so a second run rewrites identical files.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch import nn

PILLOW_VERSION = "13.0.0"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "segmentation"

NUM_CODES = 128
CODEBOOK_DIM = 512
HIDDEN = 128


# --------------------------------------------------------------------------------------------
# The VQ-VAE, with the module tree of the AiT VQ-VAE that vae-oid.npz was saved from, so that
# `state_dict()` produces exactly its key names.


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x):
        return self.net(x) + x


class VectorQuantizer(nn.Module):
    def __init__(self):
        super().__init__()
        # An EMA buffer in the original (no `.weight` suffix).
        self.register_buffer("_embedding", torch.zeros(NUM_CODES, CODEBOOK_DIM))


class VqVae(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, HIDDEN, 4, stride=2, padding=1),
            nn.ReLU(),
            ResBlock(HIDDEN),
            ResBlock(HIDDEN),
            nn.Conv2d(HIDDEN, CODEBOOK_DIM, 1),
        )
        self._vq_vae = VectorQuantizer()
        self.decoder = nn.Sequential(
            nn.Conv2d(CODEBOOK_DIM, HIDDEN, 1),  # 0
            nn.ReLU(),
            ResBlock(HIDDEN),  # 2
            ResBlock(HIDDEN),  # 3
            nn.ConvTranspose2d(HIDDEN, 128, 4, stride=2, padding=1),  # 4: 4 -> 8
            nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),  # 6: 8 -> 16
            nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 8: 16 -> 32
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),  # 10: 32 -> 64
            nn.ReLU(),
            nn.Conv2d(16, 1, 1),  # 12
        )

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, 16] codes -> [B, 64, 64] raw masks; token k sits at row k // 4, column k % 4."""
        z = self._vq_vae._embedding[codes.reshape(-1)].reshape(-1, 4, 4, CODEBOOK_DIM)
        return self.decoder(z.permute(0, 3, 1, 2))[:, 0]


def make_vae() -> VqVae:
    torch.manual_seed(20240514)
    vae = VqVae()
    with torch.no_grad():
        vae._vq_vae._embedding.normal_()
        # PyTorch's default init shrinks activations layer by layer (outputs ~1e-2); He-style
        # init keeps them O(1), so that a 1e-5 tolerance is a tight relative check.
        for m in vae.decoder.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, nn.ConvTranspose2d):
                # Each output pixel of a stride-2 4x4 transpose conv sees 2x2 taps per channel.
                fan_in = m.in_channels * 4
            else:
                continue
            m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            m.bias.uniform_(-0.1, 0.1)
        # Residual branches at half strength, as a trained net keeps its skip path dominant.
        for blk in (vae.decoder[2], vae.decoder[3]):
            blk.net[4].weight.mul_(0.5)
        # Scale and centre the output to roughly [-1, 1] with both signs (like the real
        # decoder's), so that pasting has a real boundary to threshold.
        probe = vae.decode(torch.randint(0, NUM_CODES, (64, 16)))
        vae.decoder[12].weight.div_(probe.std())
        vae.decoder[12].bias.div_(probe.std())
        probe = vae.decode(torch.randint(0, NUM_CODES, (64, 16)))
        vae.decoder[12].bias -= probe.median()
        # Nothing reads the encoder; zero it (real names and shapes, nearly free to store).
        for p in vae.encoder.parameters():
            p.zero_()
    return vae


def save_vae(vae: VqVae, path: Path) -> dict[str, list[int]]:
    state = {k: v.detach().numpy().astype(np.float32) for k, v in vae.state_dict().items()}
    # Compressed so that the zero encoder costs nothing; src/npz.rs reads stored and deflated
    # members alike.
    np.savez_compressed(path, **state)
    return {k: list(v.shape) for k, v in state.items()}


def flax_style_decode(vae: VqVae, codes: np.ndarray) -> np.ndarray:
    """big_vision's decoder formulation in float64 NumPy: HWIO kernels from
    ``transpose(2, 3, 1, 0)``, ConvTranspose as "dilate the input by 2, pad 2, correlate with
    the spatially flipped kernel" (flax ``ConvTranspose(padding=2, transpose_kernel=True)``)."""
    sd = {k: v.detach().numpy().astype(np.float64) for k, v in vae.state_dict().items()}

    def conv(x, name, pad):  # x: [B, H, W, C]; PyTorch OIHW weight.
        w = sd[name + ".weight"].transpose(2, 3, 1, 0)  # HWIO
        kh, kw = w.shape[:2]
        xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
        for i in range(kh):
            for j in range(kw):
                out += xp[:, i : i + oh, j : j + ow, :] @ w[i, j]
        return out + sd[name + ".bias"]

    def conv_transpose(x, name):
        w = sd[name + ".weight"]  # [in, out, kh, kw]
        b, h, wd, c = x.shape
        dil = np.zeros((b, 2 * h - 1, 2 * wd - 1, c))
        dil[:, ::2, ::2, :] = x
        xp = np.pad(dil, ((0, 0), (2, 2), (2, 2), (0, 0)))
        flipped = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)  # [kh, kw, in, out]
        out = np.zeros((b, 2 * h, 2 * wd, w.shape[1]))
        for i in range(4):
            for j in range(4):
                out += xp[:, i : i + 2 * h, j : j + 2 * wd, :] @ flipped[i, j]
        return out + sd[name + ".bias"]

    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    x = sd["_vq_vae._embedding"][codes.reshape(-1)].reshape(-1, 4, 4, CODEBOOK_DIM)
    x = relu(conv(x, "decoder.0", 0))
    for blk in ("decoder.2.net", "decoder.3.net"):
        r = relu(conv(x, blk + ".0", 1))
        r = relu(conv(r, blk + ".2", 1))
        x = x + conv(r, blk + ".4", 0)
    for name in ("decoder.4", "decoder.6", "decoder.8", "decoder.10"):
        x = relu(conv_transpose(x, name))
    return conv(x, "decoder.12", 0)[..., 0]


def decoder_reference(vae: VqVae) -> tuple[np.ndarray, np.ndarray, float]:
    rs = np.random.RandomState(7)
    codes = [
        np.zeros(16, np.int64),
        np.full(16, NUM_CODES - 1, np.int64),
        np.arange(16, dtype=np.int64),  # shows the row-major 4x4 token layout
        np.arange(16, dtype=np.int64)[::-1] * 8,
    ] + [rs.randint(0, NUM_CODES, size=16) for _ in range(4)]
    codes = np.stack(codes).astype(np.int64)
    with torch.no_grad():
        masks = vae.decode(torch.from_numpy(codes)).numpy().astype(np.float32)
    flax = flax_style_decode(vae, codes)
    diff = float(np.abs(flax - masks).max())
    assert diff < 1e-4, f"PyTorch and big_vision decoder formulations disagree: {diff}"
    return codes, masks, diff


# --------------------------------------------------------------------------------------------
# Pasting: big_vision's evaluator (evaluators/proj/paligemma/transfers/segmentation.py).


def evaluator_paste(m64: np.ndarray, loc: list[int], width: int, height: int):
    """Returns (pixel box (y1, x1, y2, x2), full-image bool mask) or None when invalid."""
    t = np.asarray(loc)
    if not ((np.clip(t, 0, 1023) == t).all() and t[2] > t[0] and t[3] > t[1]):
        return None
    y1, x1, y2, x2 = t / 1023
    h, w = height, width
    y1, x1, y2, x2 = map(int, (y1 * h, x1 * w, y2 * h, x2 * w))
    if x2 <= x1 or y2 <= y1:
        return None
    mi = np.asarray(
        Image.fromarray(m64).resize([x2 - x1, y2 - y1], resample=Image.BILINEAR)
    )
    full = np.zeros((h, w), bool)
    full[y1:y2, x1:x2] = mi > 0.0
    return (y1, x1, y2, x2), full


def raw_masks(decoded: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """64x64 float inputs for the pasting cases."""
    rs = np.random.RandomState(11)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
    out, names = [], []

    def add(name, m):
        out.append(np.asarray(m, np.float32))
        names.append(name)

    add("decoded_0", decoded[4])
    add("decoded_1", decoded[5])
    # A smooth field: bilinear blobs, the typical shape of a decoded mask.
    coarse = rs.uniform(-1, 1, size=(9, 9)).astype(np.float32)
    add("smooth", np.asarray(Image.fromarray(coarse).resize((64, 64), Image.BICUBIC)))
    add("noise", rs.uniform(-1, 1, size=(64, 64)))
    add("checkerboard", np.where((yy + xx) % 2 == 0, 1.0, -1.0))
    # Exact zeros and mirrored values, so that interpolated values land on exactly 0.0 and
    # the strict `> 0.0` decides; plus f32 subnormals.
    sym = np.where(xx < 32, 0.5, -0.5)
    sym[:, 30:34] = 0.0
    sym[::7, :] = 0.0
    sym[40:44, 40:44] = 1e-40
    add("zeros_and_mirror", sym)
    add("ramp", (xx - 31.5) / 32 + (yy - 31.5) / 1024)
    add("constant_positive", np.full((64, 64), 0.25))
    return np.stack(out), names


def paste_cases(n_raw: int) -> list[dict]:
    """(raw index, loc, width, height): every special case named, then random ones."""
    cases = [
        # name, raw, loc (ymin, xmin, ymax, xmax), width, height
        ("interior_downscale", 0, [200, 300, 500, 600], 160, 120),
        ("interior_upscale", 1, [100, 50, 900, 950], 640, 480),
        ("whole_image", 2, [0, 0, 1023, 1023], 500, 375),
        ("top_left_corner", 0, [0, 0, 300, 200], 333, 251),
        ("bottom_right_corner", 1, [700, 800, 1023, 1023], 333, 251),
        ("exact_64x64_box_is_a_copy", 2, [0, 0, 1023, 1023], 64, 64),
        ("box_64_wide_only_vertical", 2, [0, 0, 1023, 1023], 64, 200),
        ("box_64_tall_only_horizontal", 2, [0, 0, 1023, 1023], 200, 64),
        ("wide_up_x_down_y_vertical_first", 3, [100, 0, 200, 1023], 300, 400),
        ("tall_down_x_up_y", 3, [0, 500, 1023, 520], 700, 300),
        ("one_pixel", 0, [0, 0, 1, 1], 1023, 1023),
        ("one_pixel_image", 2, [0, 0, 1023, 1023], 1, 1),
        ("one_pixel_wide", 6, [0, 100, 1023, 102], 800, 90),
        ("one_pixel_tall", 6, [511, 0, 512, 1023], 90, 1000),
        ("non_square_strip", 4, [10, 10, 1000, 1000], 37, 300),
        ("checkerboard_odd_scale", 4, [0, 0, 1023, 1023], 97, 61),
        ("exact_zeros", 5, [0, 0, 1023, 1023], 129, 64),
        ("exact_zeros_downscale", 5, [0, 0, 1023, 1023], 23, 17),
        ("exact_zeros_upscale", 5, [0, 0, 1023, 1023], 256, 255),
        ("ramp_upscale_boundary", 6, [0, 0, 1023, 1023], 1000, 3),
        ("constant_positive", 7, [300, 300, 700, 700], 50, 50),
        # Invalid predictions.
        ("invalid_equal_y_bins", 0, [500, 100, 500, 900], 640, 480),
        ("invalid_equal_x_bins", 0, [100, 500, 900, 500], 640, 480),
        ("invalid_inverted_y", 0, [600, 100, 500, 900], 640, 480),
        ("invalid_inverted_x", 0, [100, 900, 900, 100], 640, 480),
        ("invalid_empty_after_truncation", 0, [100, 100, 101, 900], 640, 10),
        ("invalid_empty_after_truncation_x", 0, [100, 100, 900, 102], 5, 480),
        ("invalid_bin_above_1023", 0, [0, 0, 1024, 1023], 640, 480),
        ("invalid_zero_width_image", 0, [0, 0, 1023, 1023], 0, 480),
        ("invalid_zero_height_image", 0, [0, 0, 1023, 1023], 480, 0),
    ]
    out = [dict(name=c[0], raw=c[1], loc=c[2], width=c[3], height=c[4]) for c in cases]
    rs = np.random.RandomState(13)
    for i in range(160):
        # Mostly ordinary photo sizes, sometimes tiny ones where truncation empties boxes.
        if rs.rand() < 0.2:
            width, height = (int(v) for v in rs.randint(1, 40, size=2))
        else:
            width, height = (int(v) for v in rs.randint(40, 900, size=2))
        ys = sorted(int(v) for v in rs.randint(0, 1024, size=2))
        xs = sorted(int(v) for v in rs.randint(0, 1024, size=2))
        out.append(
            dict(
                name=f"random_{i}",
                raw=int(rs.randint(0, n_raw)),
                loc=[ys[0], xs[0], ys[1], xs[1]],
                width=width,
                height=height,
            )
        )
    return out


def rle_string(mask: np.ndarray) -> str:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii")


# Sizes (out_w, out_h) for which the Pillow float resize output itself is stored, to compare
# values bit for bit before thresholding.
RESIZE_SIZES = [
    (1, 1), (1, 64), (64, 1), (64, 64), (17, 5), (5, 200), (64, 30), (30, 64), (100, 100),
    (640, 10), (10, 640), (200, 130), (33, 97), (127, 129),
]


def paste_reference(decoded: np.ndarray):
    raws, raw_names = raw_masks(decoded)
    cases = paste_cases(len(raws))
    for case in cases:
        res = evaluator_paste(raws[case["raw"]], case["loc"], case["width"], case["height"])
        if res is None:
            case["valid"] = False
        else:
            box, full = res
            case["valid"] = True
            case["box"] = list(box)
            case["area"] = int(full.sum())
            case["rle"] = rle_string(full)
    resized = {}
    resize_cases = []
    for i, (w, h) in enumerate(RESIZE_SIZES):
        raw = i % len(raws)
        img = Image.fromarray(raws[raw])
        assert img.mode == "F"
        resized[f"resized_{i}"] = np.asarray(img.resize([w, h], resample=Image.BILINEAR))
        resize_cases.append(dict(raw=raw, width=w, height=h, member=f"resized_{i}"))
    return raws, raw_names, cases, resized, resize_cases


# --------------------------------------------------------------------------------------------
# COCO RLE.


def rle_reference():
    rs = np.random.RandomState(17)
    masks = {}

    def add(name, m):
        masks[name] = np.asarray(m, np.uint8)

    add("one_zero", np.zeros((1, 1)))
    add("one_one", np.ones((1, 1)))
    add("all_zeros", np.zeros((13, 7)))
    add("all_ones", np.ones((7, 13)))
    add("noise_5x7", rs.rand(5, 7) < 0.5)
    add("noise_37x300", rs.rand(37, 300) < 0.5)
    add("sparse_noise", rs.rand(64, 48) < 0.03)
    yy, xx = np.mgrid[0:480, 0:640]
    add("blobs_480x640", ((yy - 200) ** 2 + (xx - 300) ** 2 < 120**2) | ((xx > 500) & (yy > 400)))
    # One tiny blob in a big image: runs of tens of thousands (4-5 chars per count).
    big = np.zeros((300, 310))
    big[150:153, 200:202] = 1
    add("long_runs", big)
    # Runs whose deltas against the count two back are negative, zero and large.
    # (5-bit groups: 15/16 and 31/32 straddle the sign bit of a group.)
    ends = np.cumsum([3, 40, 2, 33, 17, 16, 15, 1, 31, 32, 2, 5])
    alt = np.zeros((1, int(ends[-1]) + 3), np.uint8)
    start = 0
    for i, end in enumerate(ends):
        alt[0, start:end] = i % 2
        start = end
    add("deltas", alt)
    add("column_major_order", np.eye(6, 9))
    out = []
    for name, m in masks.items():
        rle = coco_mask.encode(np.asfortranarray(m))
        assert list(rle["size"]) == list(m.shape)
        decoded = coco_mask.decode(rle)
        assert (decoded == m).all()
        out.append(dict(name=name, height=int(m.shape[0]), width=int(m.shape[1]),
                        counts=rle["counts"].decode("ascii"), area=int(m.sum())))
    return masks, out


# --------------------------------------------------------------------------------------------


def compact_json(meta: dict) -> str:
    """One top-level key per line and one list element per line: readable diffs, small file."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            items = ",\n  ".join(json.dumps(v) for v in value)
            lines.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def main() -> None:
    if PIL.__version__ != PILLOW_VERSION:
        sys.exit(f"Pillow {PILLOW_VERSION} required (found {PIL.__version__})")
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)

    vae = make_vae()
    shapes = save_vae(vae, OUT / "vae-oid-random.npz")
    codes, decoded, flax_diff = decoder_reference(vae)
    np.savez_compressed(OUT / "decoder_reference.npz", codes=codes, masks=decoded)

    raws, raw_names, cases, resized, resize_cases = paste_reference(decoded)
    np.savez_compressed(OUT / "paste_reference.npz", raw=raws, **resized)

    rle_masks, rle_cases = rle_reference()
    np.savez_compressed(OUT / "rle_reference.npz", **rle_masks)

    meta = {
        "generator": "tools/make_segmentation_fixtures.py",
        "versions": {
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "torch": torch.__version__,
            "pycocotools": importlib.metadata.version("pycocotools"),
        },
        "vae_shapes": shapes,
        "decoder": {
            "num_masks": int(len(codes)),
            "output_range": [float(decoded.min()), float(decoded.max())],
            "positive_fraction": float((decoded > 0).mean()),
            "flax_formulation_max_abs_diff": flax_diff,
        },
        "raw_names": raw_names,
        "paste_cases": cases,
        "resize_cases": resize_cases,
        "rle_cases": rle_cases,
    }
    with open(OUT / "reference.json", "w") as f:
        f.write(compact_json(meta))
    valid = sum(c["valid"] for c in cases)
    print(f"decoder: {len(codes)} masks, flax-form max diff {flax_diff:.2e}")
    print(f"paste: {len(cases)} cases ({valid} valid), {len(resize_cases)} resize value checks")
    print(f"rle: {len(rle_cases)} masks")
    for p in sorted(OUT.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
