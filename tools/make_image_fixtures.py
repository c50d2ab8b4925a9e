#!/usr/bin/env python3
"""Writes the image decoding / resize / preprocessing fixtures under tests/fixtures/images/.

The reference is transformers 5.24's PIL image processor (SiglipImageProcessorPil) fed with
``ImageOps.exif_transpose(Image.open(path))``, on Pillow 13.0.0 (the pass order of Pillow's
resize changed in 13.0.0, so the version is pinned and checked).

Run from the repository root:

    venv/bin/python tools/make_image_fixtures.py

Everything is derived from fixed seeds, so a second run rewrites identical files.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import transformers
from PIL import Image, ImageOps, PngImagePlugin
from transformers import SiglipImageProcessorPil
from transformers.image_transforms import convert_to_rgb

PILLOW_VERSION = "13.0.0"
OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "images"

# Largest output size for which full float pixel_values are stored; larger cases store the
# resized uint8 image and rely on the per-byte value table (verified here to be equivalent).
MAX_STORED_PIXEL_VALUES = 100 * 100


# --------------------------------------------------------------------------------------------
# Synthetic content


def synth(w: int, h: int, seed: int, posterize: int = 1, noise: int = 48) -> np.ndarray:
    """A smooth colour field with saturated shapes (to make bicubic overshoot and clip) and a
    small noisy patch (to exercise rounding on high-frequency content). ``posterize`` quantises
    the smooth part so that large images still compress well as PNG."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) / max(w, h, 1)
    img = np.full((h, w, 3), 128.0)
    for c in range(3):
        for _ in range(3):
            fx, fy = rs.uniform(0.5, 4.0, size=2)
            img[..., c] += rs.uniform(15, 50) * np.sin(2 * np.pi * (fx * xx + fy * yy) + rs.uniform(0, 6.3))
    if posterize > 1:
        img = np.floor(img / posterize) * posterize
    for _ in range(5):
        x0, x1 = sorted(rs.randint(0, w + 1, size=2))
        y0, y1 = sorted(rs.randint(0, h + 1, size=2))
        img[y0:y1, x0:x1] = rs.choice([0, 255], size=3)
    ph, pw = min(h, 64, max(1, h // 3)), min(w, 64, max(1, w // 3))
    py, px = rs.randint(0, h - ph + 1), rs.randint(0, w - pw + 1)
    img[py : py + ph, px : px + pw] += rs.uniform(-noise, noise, size=(ph, pw, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def noise_image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Raw PNG writer, for layouts Pillow cannot save (16-bit RGB, RGBA, gray+alpha) and for
# malformed headers.


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png16(arr: np.ndarray, color_type: int) -> bytes:
    h, w = arr.shape[:2]
    be = arr.astype(">u2").reshape(h, -1).tobytes()
    stride = len(be) // h
    rows = b"".join(b"\x00" + be[i * stride : (i + 1) * stride] for i in range(h))
    return raw_png(w, h, 16, color_type, rows)


def place_gif_frame(data: bytes, screen_w: int, screen_h: int, left: int, top: int) -> bytes:
    """Enlarges a single-frame GIF's canvas and moves its frame (Pillow writes frame 0 at the
    origin on a canvas of its own size)."""
    d = bytearray(data)
    d[6:10] = struct.pack("<HH", screen_w, screen_h)
    pos = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while d[pos] == 0x21:  # skip extensions
        pos += 2
        while d[pos]:
            pos += 1 + d[pos]
        pos += 1
    assert d[pos] == 0x2C
    d[pos + 1 : pos + 5] = struct.pack("<HH", left, top)
    return bytes(d)


def set_tiff_extra_samples(data: bytes, value: int) -> bytes:
    """Rewrites the ExtraSamples (338) value of a little-endian TIFF's first IFD."""
    d = bytearray(data)
    assert d[:4] == b"II*\x00"
    (ifd,) = struct.unpack("<I", d[4:8])
    (n,) = struct.unpack("<H", d[ifd : ifd + 2])
    for k in range(n):
        e = ifd + 2 + 12 * k
        tag, typ, count = struct.unpack("<HHI", d[e : e + 8])
        if tag == 338:
            assert typ == 3 and count == 1
            d[e + 8 : e + 10] = struct.pack("<H", value)
            return bytes(d)
    raise AssertionError("no ExtraSamples tag")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk bytes) for each chunk of a PNG file."""
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + length]))
        pos += 12 + length
    return out


def move_chunk_after_idat(data: bytes, kind: bytes) -> bytes:
    chunks = png_chunks(data)
    moved = [c for k, c in chunks if k == kind]
    assert moved, kind
    rest = [(k, c) for k, c in chunks if k != kind]
    last_idat = max(i for i, (k, _) in enumerate(rest) if k == b"IDAT")
    body = [c for _, c in rest[: last_idat + 1]] + moved + [c for _, c in rest[last_idat + 1 :]]
    return data[:8] + b"".join(body)


# --------------------------------------------------------------------------------------------
# Reference pipeline


def reference_decode(path: Path) -> np.ndarray:
    """What transformers' PIL processor sees: EXIF-transposed, then convert_to_rgb (alpha or a
    transparency key composited onto white)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return convert_to_rgb(im, return_numpy=True)


def processor_kwargs(config: dict) -> dict:
    keys = (
        "do_resize size resample do_rescale rescale_factor do_normalize image_mean image_std"
        " do_convert_rgb"
    ).split()
    return {k: config[k] for k in keys if k in config}


def value_table(config: dict) -> np.ndarray:
    """pixel value per (channel, byte) as the processor computes it, from a 3x256 image."""
    proc = SiglipImageProcessorPil(**{**processor_kwargs(config), "do_resize": False})
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    out = proc(Image.fromarray(ramp, "RGB"), return_tensors="np")["pixel_values"][0]
    assert out.dtype == np.float32 and out.shape == (3, 1, 256)
    return out[:, 0, :]


def run_processor(path: Path, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(resized uint8 HWC, pixel_values float32 CHW) from the transformers processor."""
    kwargs = processor_kwargs(config)
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        pv = SiglipImageProcessorPil(**kwargs)(im, return_tensors="np")["pixel_values"][0]
        raw_kwargs = {**kwargs, "do_rescale": False, "do_normalize": False}
        resized = SiglipImageProcessorPil(**raw_kwargs)(im, return_tensors="np")["pixel_values"][0]
    assert resized.dtype == np.uint8, resized.dtype
    return resized.transpose(1, 2, 0), pv


# --------------------------------------------------------------------------------------------
# Sources


def save_pil(name: str, im: Image.Image, **params) -> str:
    rel = f"src/{name}"
    im.save(OUT / rel, **params)
    return rel


def save_bytes(name: str, data: bytes) -> str:
    rel = f"src/{name}"
    (OUT / rel).write_bytes(data)
    return rel


def exif_with_orientation(o: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = o
    return exif


def make_sources() -> dict[str, dict]:
    """name -> {path, format, exact (bit-exact decode expected), note}"""
    s: dict[str, dict] = {}

    def add(name, rel, fmt, exact=True, note=""):
        s[name] = {"source": rel, "format": fmt, "exact": exact, "note": note}

    rgb = lambda a: Image.fromarray(a, "RGB")  # noqa: E731

    # Resize geometry: up/down scales, extreme aspect ratios, both Pillow 13 pass orders.
    add("tiny_1x1", save_pil("tiny_1x1.png", rgb(np.array([[[200, 30, 90]]], np.uint8))), "png")
    add("strip_3x500", save_pil("strip_3x500.png", rgb(synth(3, 500, 1))), "png",
        note="height shrinks, width grows: vertical pass first in Pillow 13")
    add("strip_500x3", save_pil("strip_500x3.png", rgb(synth(500, 3, 2))), "png")
    add("small_7x5", save_pil("small_7x5.png", rgb(noise_image(7, 5, 3))), "png")
    add("noise_90x75", save_pil("noise_90x75.png", rgb(noise_image(90, 75, 4))), "png")
    add("photo_640x480", save_pil("photo_640x480.png", rgb(synth(640, 480, 5, posterize=2))), "png")
    add("wide_1000x37", save_pil("wide_1000x37.png", rgb(synth(1000, 37, 6))), "png")
    add("tall_300x1000", save_pil("tall_300x1000.png", rgb(synth(300, 1000, 7, posterize=4))), "png",
        note="vertical pass first in Pillow 13")
    add("edge_324x424", save_pil("edge_324x424.png", rgb(synth(324, 424, 8, posterize=4))), "png",
        note="height shrink exactly twice the width shrink at 224: horizontal first")
    add("edge_323x424", save_pil("edge_323x424.png", rgb(synth(323, 424, 8, posterize=4))), "png",
        note="one pixel narrower: vertical first at 224")
    add("square_224", save_pil("square_224.png", rgb(synth(224, 224, 9))), "png",
        note="already 224x224: returned unchanged")
    add("large_1600x1200", save_pil("large_1600x1200.png",
        rgb(synth(1600, 1200, 10, posterize=16))), "png", note="strong downscale")

    # Pixel layouts.
    g = synth(200, 150, 11)[..., 1]
    add("gray_200x150", save_pil("gray_200x150.png", Image.fromarray(g, "L")), "png")
    rgba = np.dstack([synth(300, 200, 12), np.tile(np.linspace(0, 255, 300).astype(np.uint8), (200, 1))])
    add("rgba_300x200", save_pil("rgba_300x200.png", Image.fromarray(rgba, "RGBA")), "png",
        note="alpha ramp composited onto white")
    la = np.dstack([synth(100, 80, 13)[..., 0], noise_image(100, 80, 14)[..., 0]])
    add("la_100x80", save_pil("la_100x80.png", Image.fromarray(la, "LA")), "png")
    pal = Image.fromarray(synth(64, 48, 15), "RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    add("palette_trns_64x48", save_pil("palette_trns_64x48.png", pal, transparency=3), "png",
        note="palette with one transparent index")
    pal_alpha = pal.copy()
    add("palette_alpha_64x48", save_pil("palette_alpha_64x48.png", pal_alpha,
        transparency=bytes((i * 17) % 256 for i in range(16))), "png",
        note="palette with per-entry alpha (tRNS table)")
    add("palette_4bit_33x17", save_pil("palette_4bit_33x17.png",
        Image.fromarray(synth(33, 17, 16), "RGB").quantize(colors=16, dither=Image.Dither.NONE), bits=4), "png")
    add("bilevel_37x21", save_pil("bilevel_37x21.png",
        Image.fromarray(noise_image(37, 21, 17)[..., 0] > 127)), "png", note="1-bit")
    add("rgb_trns_50x40", save_pil("rgb_trns_50x40.png", rgb(synth(50, 40, 18, posterize=64)),
        transparency=(0, 0, 0)), "png", note="RGB with a transparent colour key")
    add("gray_trns_50x40", save_pil("gray_trns_50x40.png",
        Image.fromarray(synth(50, 40, 19, posterize=64)[..., 0], "L"), transparency=255), "png")
    rgb16 = (synth(40, 30, 20).astype(np.uint16) * 257 + noise_image(40, 30, 21).astype(np.uint16))
    add("rgb16_40x30", save_bytes("rgb16_40x30.png", png16(rgb16, 2)), "png", note="16-bit: high byte")
    rgba16 = np.dstack([rgb16, (noise_image(40, 30, 22)[..., 0].astype(np.uint16) * 257)])
    add("rgba16_40x30", save_bytes("rgba16_40x30.png", png16(rgba16, 6)), "png")
    la16 = np.dstack([rgb16[..., 0], rgba16[..., 3]])
    add("la16_40x30", save_bytes("la16_40x30.png", png16(la16, 4)), "png")
    gray16 = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 7 % 700).astype(np.uint16)
    add("gray16_40x30", save_bytes("gray16_40x30.png", png16(gray16, 0)), "png",
        note="Pillow's I;16 -> RGB saturates at 255 instead of scaling")

    # Other containers.
    add("gif_trns_60x40", save_pil("gif_trns_60x40.gif", pal, transparency=3), "gif")
    frames = [Image.fromarray(synth(60, 40, 23 + i), "RGB").quantize(colors=32, dither=Image.Dither.NONE) for i in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("gif_anim_60x40", save_bytes("gif_anim_60x40.gif", buf.getvalue()), "gif", note="first frame")
    # First frame smaller than the canvas: Pillow shows palette index 0 around it (not the
    # background colour, and not transparency unless the frame has a transparent index).
    small = Image.fromarray(synth(10, 12, 41, posterize=32), "RGB").quantize(colors=8, dither=Image.Dither.NONE)
    for name, params in (("gif_offset_opaque", {}), ("gif_offset_trns", {"transparency": 2})):
        buf = io.BytesIO()
        small.save(buf, format="GIF", **params)
        add(name, save_bytes(f"{name}_16x18.gif", place_gif_frame(buf.getvalue(), 16, 18, 3, 4)), "gif",
            note="10x12 frame at (3,4) on a 16x18 canvas")
    add("bmp_rgb_61x43", save_pil("bmp_rgb_61x43.bmp", rgb(synth(61, 43, 25))), "bmp")
    add("bmp_pal_61x43", save_pil("bmp_pal_61x43.bmp", Image.fromarray(synth(61, 43, 26), "RGB").quantize(colors=64, dither=Image.Dither.NONE)), "bmp")
    add("tiff_rgb_45x33", save_pil("tiff_rgb_45x33.tiff", rgb(synth(45, 33, 27))), "tiff")
    add("tiff_lzw_45x33", save_pil("tiff_lzw_45x33.tiff", rgb(synth(45, 33, 28)), compression="tiff_lzw"), "tiff")
    add("tiff_gray_45x33", save_pil("tiff_gray_45x33.tiff", Image.fromarray(synth(45, 33, 29)[..., 2], "L")), "tiff")
    add("tiff_orient6_45x33", save_pil("tiff_orient6_45x33.tiff", rgb(synth(45, 33, 30)),
        tiffinfo={0x0112: 6}), "tiff", note="TIFF orientation tag")
    # RGBA TIFF read three ways by Pillow, by the ExtraSamples tag: 2 = straight alpha,
    # 1 = premultiplied (un-premultiplied on load), 0 = unspecified (alpha ignored).
    trgba = np.dstack([synth(30, 20, 42), noise_image(30, 20, 43)[..., 0]])
    buf = io.BytesIO()
    Image.fromarray(trgba, "RGBA").save(buf, format="TIFF")
    for value, label in ((2, "straight"), (1, "assoc"), (0, "unspec")):
        add(f"tiff_rgba_{label}", save_bytes(f"tiff_rgba_{label}_30x20.tiff", set_tiff_extra_samples(buf.getvalue(), value)),
            "tiff", note=f"ExtraSamples = {value}")
    add("bmp_rgba_30x20", save_pil("bmp_rgba_30x20.bmp", Image.fromarray(trgba, "RGBA")), "bmp",
        note="32-bit BMP: Pillow ignores the fourth byte")
    add("webp_lossy_60x40", save_pil("webp_lossy_60x40.webp", rgb(synth(60, 40, 44)), quality=80), "webp")
    add("webp_lossy_rgba_30x20", save_pil("webp_lossy_rgba_30x20.webp", Image.fromarray(trgba, "RGBA"), quality=80),
        "webp")
    add("webp_rgb_50x30", save_pil("webp_rgb_50x30.webp", rgb(synth(50, 30, 31)), lossless=True), "webp")
    add("webp_rgba_50x30", save_pil("webp_rgba_50x30.webp",
        Image.fromarray(np.dstack([synth(50, 30, 32), noise_image(50, 30, 33)[..., 0]]), "RGBA"), lossless=True), "webp")
    add("webp_orient8_50x30", save_pil("webp_orient8_50x30.webp", rgb(synth(50, 30, 34)), lossless=True,
        exif=exif_with_orientation(8)), "webp", note="EXIF orientation in WebP")

    # EXIF orientation 1-8 in PNG (eXIf chunk; decoded bit-exactly) and JPEG.
    base = rgb(synth(6, 4, 35))
    for o in range(1, 9):
        add(f"png_orient{o}", save_pil(f"png_orient{o}_6x4.png", base, exif=exif_with_orientation(o)), "png",
            note=f"eXIf orientation {o}")
    add("png_orient6_120x80", save_pil("png_orient6_120x80.png", rgb(synth(120, 80, 36)),
        exif=exif_with_orientation(6)), "png", note="orientation then resize")
    # Orientation given only in XMP (Pillow's fallback when the EXIF tag is absent), and XMP
    # contradicting an explicit EXIF 1 (the EXIF tag wins).
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    add("png_xmp_orient6", save_pil("png_xmp_orient6_6x4.png", base, pnginfo=info), "png",
        note="XMP-only orientation 6")
    add("png_exif1_xmp6", save_pil("png_exif1_xmp6_6x4.png", base, pnginfo=info,
        exif=exif_with_orientation(1)), "png", note="EXIF 1 wins over XMP 6")
    add("jpeg_xmp_orient8", save_pil("jpeg_xmp_orient8_48x32.jpg", rgb(synth(48, 32, 37)), quality=95,
        subsampling=0, xmp=xmp.replace(b'"6"', b'"8"')), "jpeg", exact=False, note="XMP-only orientation 8")
    add("webp_xmp_orient5", save_pil("webp_xmp_orient5_50x30.webp", rgb(synth(50, 30, 34)), lossless=True,
        xmp=xmp.replace(b'"6"', b'"5"')), "webp", note="XMP-only orientation 5")
    # eXIf placed after the image data (allowed by the PNG spec; Pillow reads it on load).
    add("png_exif_after_idat", save_bytes("png_exif_after_idat_6x4.png",
        move_chunk_after_idat((OUT / "src" / "png_orient6_6x4.png").read_bytes(), b"eXIf")), "png",
        note="eXIf chunk after IDAT")

    jbase = rgb(synth(48, 32, 37))
    for o in range(1, 9):
        add(f"jpeg_orient{o}", save_pil(f"jpeg_orient{o}_48x32.jpg", jbase, quality=95, subsampling=0,
            exif=exif_with_orientation(o)), "jpeg", exact=False,
            note=f"EXIF orientation {o}; same compressed data as jpeg_orient1")
    add("jpeg_photo_160x120", save_pil("jpeg_photo_160x120.jpg", rgb(synth(160, 120, 38)), quality=90), "jpeg",
        exact=False, note="4:2:0; decoders differ in IDCT and chroma upsampling")
    add("jpeg_gray_64x48", save_pil("jpeg_gray_64x48.jpg", Image.fromarray(synth(64, 48, 39)[..., 0], "L"),
        quality=90), "jpeg", exact=False)
    add("jpeg_cmyk_64x48", save_pil("jpeg_cmyk_64x48.jpg", rgb(synth(64, 48, 40)).convert("CMYK"), quality=95),
        "jpeg", exact=False, note="CMYK JPEG")
    return s


def make_error_inputs() -> list[dict]:
    """Inputs that must fail cleanly, with a word the error message must contain."""
    good = (OUT / "src" / "photo_640x480.png").read_bytes()
    rs = np.random.RandomState(99)
    errors = [
        ("empty.png", b"", "empty"),
        ("random_bytes.bin", rs.randint(0, 256, size=4096, dtype=np.uint8).tobytes(), "not a recognised image"),
        ("text_named.png", b"this is not an image, despite the .png name\n", "not a recognised image"),
        ("truncated.png", good[: len(good) // 3], "corrupt or truncated"),
        ("bad_crc.png", good[:40] + bytes([good[40] ^ 0xFF]) + good[41:2000], "corrupt or truncated"),
        ("huge_header.png", raw_png(200_000, 100_000, 8, 2, b"\x00\x00\x00\x00"), "too large"),
        ("zero_size.gif", b"GIF89a" + struct.pack("<HHBBB", 0, 0, 0, 0, 0)
            + b"," + struct.pack("<HHHHB", 0, 0, 0, 0, 0) + bytes([2, 2, 0x44, 0x01, 0]) + b";", "zero-size"),
        # PNG forbids a zero width, so the decoder itself rejects the header.
        ("zero_width.png", raw_png(0, 5, 8, 2, b""), "Invalid image dimensions"),
    ]
    out = []
    for name, data, word in errors:
        rel = f"errors/{name}"
        (OUT / rel).write_bytes(data)
        out.append({"source": rel, "message_contains": word})
    return out


# --------------------------------------------------------------------------------------------
# Configs and cases


def paligemma_config(size: int) -> dict:
    return {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": (size // 14) ** 2,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": size, "width": size},
    }


CONFIGS = {
    "paligemma_56": paligemma_config(56),
    "paligemma_224": paligemma_config(224),
    "paligemma_448": paligemma_config(448),
    # Non-square target and per-channel statistics (ImageNet's), to exercise the float32 path.
    "imagenet_64x96": {
        "do_resize": True, "size": {"height": 64, "width": 96}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    },
    # Aspect-preserving resize (transformers truncates the long side).
    "shortest_edge_64": {"size": {"shortest_edge": 64}, "image_mean": 0.5, "image_std": 0.5},
    # Normalising raw bytes (no rescale).
    "no_rescale_40": {
        "size": {"height": 40, "width": 40}, "do_rescale": False,
        "image_mean": [127.5, 127.5, 127.5], "image_std": [127.5, 127.5, 127.5],
    },
    # Resize switched off: the image keeps its own size.
    "no_resize": {"do_resize": False},
}

PREPROCESS_CASES = [
    ("tiny_1x1", ["paligemma_224", "paligemma_56"]),
    ("strip_3x500", ["paligemma_224", "paligemma_56"]),
    ("strip_500x3", ["paligemma_224", "paligemma_56"]),
    ("small_7x5", ["paligemma_224", "paligemma_56", "paligemma_448"]),
    ("noise_90x75", ["paligemma_56", "paligemma_224", "no_rescale_40", "no_resize"]),
    ("photo_640x480", ["paligemma_224", "paligemma_448", "paligemma_56", "imagenet_64x96", "shortest_edge_64"]),
    ("wide_1000x37", ["paligemma_224", "paligemma_56"]),
    ("tall_300x1000", ["paligemma_224", "paligemma_56", "shortest_edge_64"]),
    ("edge_324x424", ["paligemma_224"]),
    ("edge_323x424", ["paligemma_224"]),
    ("square_224", ["paligemma_224", "paligemma_56"]),
    ("large_1600x1200", ["paligemma_224", "paligemma_448", "paligemma_56"]),
    ("gray_200x150", ["paligemma_224"]),
    ("rgba_300x200", ["paligemma_224", "paligemma_56"]),
    ("la_100x80", ["paligemma_56"]),
    ("palette_trns_64x48", ["paligemma_56"]),
    ("rgb16_40x30", ["paligemma_56"]),
    ("png_orient6_120x80", ["paligemma_56", "imagenet_64x96"]),
    ("webp_rgba_50x30", ["paligemma_56"]),
    ("gif_trns_60x40", ["paligemma_56"]),
]


def write_png(rel: str, arr: np.ndarray) -> str:
    Image.fromarray(arr, "RGB").save(OUT / rel, optimize=True)
    return rel


def main() -> None:
    if PIL.__version__ != PILLOW_VERSION:
        sys.exit(f"Pillow {PILLOW_VERSION} is required (found {PIL.__version__}): resize pass order differs")
    if OUT.exists():
        shutil.rmtree(OUT)
    for d in ("src", "errors", "configs", "expected/decoded", "expected/resized", "expected/pixel_values", "expected/value_tables"):
        (OUT / d).mkdir(parents=True)

    sources = make_sources()
    decode_cases = []
    for name, info in sources.items():
        arr = reference_decode(OUT / info["source"])
        case = {"name": name, **info, "width": arr.shape[1], "height": arr.shape[0]}
        case["expected"] = write_png(f"expected/decoded/{name}.png", arr)
        decode_cases.append(case)

    configs = {}
    for cname, cfg in CONFIGS.items():
        rel = f"configs/{cname}.json"
        (OUT / rel).write_text(json.dumps(cfg, indent=2) + "\n")
        table = value_table(cfg)
        trel = f"expected/value_tables/{cname}.bin"
        table.astype("<f4").tofile(OUT / trel)
        configs[cname] = {"config": rel, "value_table": trel, "table": table}

    preprocess_cases = []
    for name, cnames in PREPROCESS_CASES:
        src = OUT / sources[name]["source"]
        decoded = reference_decode(src)
        for cname in cnames:
            cfg = CONFIGS[cname]
            resized, pv = run_processor(src, cfg)
            h, w = resized.shape[:2]
            # The resize is Pillow's bicubic on the decoded image, and nothing else.
            if cfg.get("do_resize", True):
                direct = np.array(Image.fromarray(decoded, "RGB").resize((w, h), Image.BICUBIC, reducing_gap=None))
                assert np.array_equal(direct, resized), (name, cname)
            # pixel_values are the per-byte table applied to the resized image, exactly.
            table = configs[cname]["table"]
            via_table = np.stack([table[c][resized[..., c]] for c in range(3)])
            assert via_table.shape == pv.shape and np.array_equal(via_table.view(np.uint32), pv.view(np.uint32)), (name, cname)
            case = {
                "name": f"{name}@{cname}",
                "source": sources[name]["source"],
                "config": configs[cname]["config"],
                "value_table": configs[cname]["value_table"],
                "input_width": decoded.shape[1],
                "input_height": decoded.shape[0],
                "width": w,
                "height": h,
                "resized": write_png(f"expected/resized/{name}@{cname}.png", resized),
                "pixel_values": None,
            }
            if h * w <= MAX_STORED_PIXEL_VALUES:
                prel = f"expected/pixel_values/{name}@{cname}.f32"
                pv.astype("<f4").tofile(OUT / prel)
                case["pixel_values"] = prel
            preprocess_cases.append(case)

    manifest = {
        "generator": "tools/make_image_fixtures.py",
        "pillow_version": PIL.__version__,
        "transformers_version": transformers.__version__,
        "numpy_version": np.__version__,
        "reference": "SiglipImageProcessorPil(ImageOps.exif_transpose(Image.open(source)))",
        "notes": {
            "decoded": "expected/decoded: convert_to_rgb(exif_transpose(open(source))) as RGB PNG",
            "resized": "expected/resized: the processor's uint8 image after resize (PNG)",
            "pixel_values": "raw little-endian f32, [3, height, width]; stored for small outputs",
            "value_table": "raw little-endian f32 [3, 256]: the processor's output for byte v in channel c; "
            "pixel_values == value_table[c][resized[..., c]] bit for bit (checked by the generator)",
            "exact": "false for JPEG: Pillow (libjpeg-turbo) and the Rust decoder round differently",
        },
        "decode_cases": decode_cases,
        "preprocess_cases": preprocess_cases,
        "error_cases": make_error_inputs(),
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {len(decode_cases)} decode cases, {len(preprocess_cases)} preprocess cases, "
          f"{len(manifest['error_cases'])} error inputs; {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
