#!/usr/bin/env python3
"""End-to-end benchmark: `paligemma generate` on a random checkpoint with a released model's
real shapes, against transformers on the same checkpoint in the same run. Writes the table to
BENCHMARKS.md (between the e2e markers) and prints it.

    python3 tools/bench_e2e.py [--variant pg1-3b-224] [--python venv/bin/python] [--tokens 32]

--python must have torch/transformers/numpy (tools/requirements.txt): it generates the
checkpoint once (cached under bench-cache/) and runs the transformers peer. Without it the
peer is skipped and said so. CANDLE_PALIGEMMA=path/to/paligemma (candle's example, built with
`cargo build --release --example paligemma` in a checkout of candle) adds candle as a peer. Measures: load, time to first token (image decode + preprocess +
vision + prefill + first token), decode seconds per later token, and peak RSS (/usr/bin/time).
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "tests/fixtures/images/src/photo_640x480.png")
BEGIN, END = "<!-- e2e:begin -->", "<!-- e2e:end -->"


def run(cmd, **kw):
    print("$", " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def peak_rss_gb(stderr):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) / 1e6 if m else float("nan")


def ours(binary, model, flags, tokens):
    cmd = ["/usr/bin/time", "-v", binary, "generate", "--model", model, "--image", IMAGE,
           "--prompt", "caption en", "--max-new-tokens", str(tokens)] + flags
    # Memory-mapped weights are read from disk while the first token is computed when a
    # run before (the f32 ones, 17 GB) pushed them out of the page cache: the first of two
    # runs puts them back, the second is measured (the peers read theirs while loading).
    run(cmd)
    p = run(cmd)
    if p.returncode != 0:
        raise SystemExit(f"paligemma failed:\n{p.stderr}")
    load = float(re.search(r"loaded .* in ([\d.]+)s", p.stderr).group(1))
    m = re.search(r"(\d+) tokens in ([\d.]+)s \(images encoded after ([\d.]+)s, "
                  r"first token after ([\d.]+)s\)", p.stderr)
    n, total, vision, ttft = int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))
    per_token = (total - ttft) / (n - 1) if n > 1 else float("nan")
    return {"load_s": load, "vision_s": vision, "ttft_s": ttft, "decode_s_per_token": per_token,
            "new_tokens": n, "peak_rss_gb": peak_rss_gb(p.stderr)}, " ".join(cmd[2:])


def peer(python, model, dtype, tokens):
    cmd = ["/usr/bin/time", "-v", python, os.path.join(ROOT, "tools/bench_transformers.py"),
           "--model", model, "--image", IMAGE, "--max-new-tokens", str(tokens), "--dtype", dtype]
    p = run(cmd)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None, " ".join(cmd[2:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["peak_rss_gb"] = peak_rss_gb(p.stderr)
    return r, " ".join(cmd[2:])


def parse_duration(text):
    """Seconds from Rust's Debug format of a Duration (`16.2s`, `850.3ms`, `12µs`)."""
    m = re.match(r"([\d.]+)(s|ms|µs|us|ns)$", text)
    scale = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}[m.group(2)]
    return float(m.group(1)) * scale


def candle_peer(binary, model, tokens):
    """candle's PaliGemma example (candle-examples, `--example paligemma`), f32 on the CPU,
    on the same files. Its tokens/s counts the prefill too, so it runs twice: one new token
    (time to first token) and `tokens` (decode = the difference per further token)."""
    weights = ",".join(sorted(os.path.join(model, f) for f in os.listdir(model)
                              if f.endswith(".safetensors")))
    runs, cmd = [], None
    for n in (1, tokens):
        cmd = ["/usr/bin/time", "-v", binary, "--cpu", "--prompt", "caption en",
               "--image", IMAGE, "--weight-files", weights,
               "--tokenizer-file", os.path.join(model, "tokenizer.json"),
               "--sample-len", str(n), "--repeat-penalty", "1"]
        p = run(cmd)
        if p.returncode != 0:
            print(p.stderr[-2000:], file=sys.stderr)
            return None, " ".join(cmd[2:])
        load = parse_duration(re.search(r"loaded the model in (\S+)", p.stdout).group(1))
        m = re.search(r"(\d+) tokens generated \(([\d.]+) token/s\)", p.stdout)
        generated = int(m.group(1))
        runs.append((load, generated, generated / float(m.group(2)), peak_rss_gb(p.stderr)))
    (load, _, first, _), (_, n, total, rss) = runs
    return {"load_s": load, "ttft_s": first,
            "decode_s_per_token": (total - first) / (n - 1) if n > 1 else float("nan"),
            "new_tokens": n, "peak_rss_gb": rss}, " ".join(cmd[2:])


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="pg1-3b-224")
    ap.add_argument("--python", default=os.path.join(ROOT, "venv/bin/python"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()

    model = os.path.join(ROOT, "bench-cache", f"{args.variant}-bf16")
    have_python = os.path.exists(args.python)
    if not os.path.exists(os.path.join(model, "config.json")):
        if not have_python:
            raise SystemExit(f"{model} is missing and --python {args.python} does not exist to make it")
        p = run([args.python, os.path.join(ROOT, "tools/make_random_checkpoint.py"),
                 "--variant", args.variant, "--dtype", "bf16", "--out", model])
        if p.returncode != 0:
            raise SystemExit(p.stderr)
    p = run(["cargo", "build", "--release", "--quiet"], cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    binary = os.path.join(ROOT, "target/release/paligemma")

    # Quantized folders, written once by `paligemma quantize` (cached like the checkpoint).
    saved = {}
    for q in ("q8", "q4"):
        saved[q] = os.path.join(ROOT, "bench-cache", f"{args.variant}-{q}")
        if not os.path.exists(os.path.join(saved[q], "model.safetensors")):
            p = run([binary, "quantize", "--model", model, "--out", saved[q], "--quant", q])
            if p.returncode != 0:
                raise SystemExit(p.stderr)

    rows = []
    for name, path, flags in [
        ("bf16", model, ["--dtype", "bf16"]),
        ("f32", model, ["--dtype", "f32"]),
        ("q8, quantized at load", model, ["--quant", "q8"]),
        ("q4, quantized at load", model, ["--quant", "q4"]),
        ("q8, folder saved by `paligemma quantize`", saved["q8"], []),
        ("q4, folder saved by `paligemma quantize`", saved["q4"], []),
    ]:
        r, cmd = ours(binary, path, flags, args.tokens)
        rows.append((f"paligemma-rs, {name}", r, cmd))
    if have_python and not args.skip_peer:
        for dtype in ("f32",):
            r, cmd = peer(args.python, model, dtype, args.tokens)
            rows.append((f"transformers 5.24 (torch CPU, eager), {dtype}", r, cmd))
    candle = os.environ.get("CANDLE_PALIGEMMA")
    if candle and not args.skip_peer:
        r, cmd = candle_peer(candle, model, args.tokens)
        rows.append(("candle 0.11 `paligemma` example, f32", r, cmd))

    def fmt(r, key, unit):
        if r is None:
            return "failed"
        return f"{r[key]:.2f} {unit}" if key in r else "–"

    for _, r, _ in rows:
        if r is not None and "vision_s" in r:
            r["prefill_s"] = r["ttft_s"] - r["vision_s"]

    lines = [
        BEGIN,
        f"### End to end: random {args.variant} checkpoint (bf16 safetensors), greedy, "
        f"`caption en` on a 640×480 PNG",
        "",
        f"Measured {datetime.date.today()} on {machine()} by `python3 tools/bench_e2e.py "
        f"--variant {args.variant} --tokens {args.tokens}`; all rows in the same run. Each "
        f"paligemma-rs row is the second of two runs, so that its memory-mapped weights are in "
        f"the page cache (the peers read theirs while loading). Time to first token counts "
        f"from the image file to the first generated token: vision (image decoding, "
        f"preprocessing, SigLIP and the projector), then prefill (the decoder over the prefix "
        f"and the first token); candle's example reports no split.",
        "",
        "| runtime | load | vision | prefill | time to first token | decode | new tokens | "
        "peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r, _ in rows:
        lines.append(f"| {name} | {fmt(r, 'load_s', 's')} | {fmt(r, 'vision_s', 's')} | "
                     f"{fmt(r, 'prefill_s', 's')} | {fmt(r, 'ttft_s', 's')} | "
                     f"{fmt(r, 'decode_s_per_token', 's/token')} | "
                     f"{'-' if r is None else r['new_tokens']} | {fmt(r, 'peak_rss_gb', 'GB')} |")
    lines += ["", "Commands:", ""] + [f"- `{cmd}`" for _, _, cmd in rows] + [END]
    table = "\n".join(lines)
    print(table)

    path = os.path.join(ROOT, "BENCHMARKS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    open(path, "w").write(text)


if __name__ == "__main__":
    main()
