#!/usr/bin/env python
"""The transformers peer for tools/bench_e2e.py: one greedy generation, timed like ours.

Prints one JSON line: load_s (from_pretrained), vision_s (image decoding, preprocessing, vision
tower and projector), ttft_s (that + prefill + first token), decode_s_per_token (later tokens),
new_tokens, peak_rss_gb.

    python tools/bench_transformers.py --model DIR --image IMG --prompt "caption en" \
        --max-new-tokens 32 --dtype f32
"""
import argparse
import json
import resource
import time

import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers.generation.streamers import BaseStreamer


class Clock(BaseStreamer):
    """Records when each generated token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times = []
        self.seen_prompt = False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", default="caption en")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        args.model, dtype=dtype, attn_implementation="eager").eval()
    processor = PaliGemmaProcessor.from_pretrained(args.model)
    load_s = time.perf_counter() - t0

    clock = Clock()
    # The projector's output is the end of the vision stage inside generate().
    projector = next(m for name, m in model.named_modules() if name.endswith("multi_modal_projector"))
    encoded = []
    projector.register_forward_hook(lambda *_: encoded.append(time.perf_counter()))
    start = time.perf_counter()
    image = Image.open(args.image).convert("RGB")
    inputs = processor(text=args.prompt, images=image, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=clock)
    times = clock.times
    ttft = times[0] - start
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    print(json.dumps({"load_s": load_s, "vision_s": encoded[0] - start, "ttft_s": ttft, "decode_s_per_token": per_token,
                      "new_tokens": len(times), "peak_rss_gb": peak_gb}))


if __name__ == "__main__":
    main()
