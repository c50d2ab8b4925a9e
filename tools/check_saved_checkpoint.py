#!/usr/bin/env python
"""Checks that a folder written by `paligemma train` loads in transformers and computes what
our implementation computes on it.

Usage:
    venv/bin/python tools/check_saved_checkpoint.py OUT_DIR \
        [--image IMG] [--prompt "caption en"] [--suffix "a red circle"] [--bin target/debug/paligemma]
    venv/bin/python tools/check_saved_checkpoint.py BASE_DIR --adapter LORA_DIR [...]

With --adapter (a folder written by `paligemma train --train lora`), ours runs with `--adapter`
and transformers loads the base model and then the adapter with PEFT's
`PeftModel.from_pretrained` (which must find every adapter key).

It runs `paligemma score --json` on the folder (which gives the exact token ids, image tokens
included, and our log-probabilities of the suffix tokens and <eos>), then loads the folder with
`PaliGemmaForConditionalGeneration.from_pretrained` (fp32, eager attention; any missing or
unexpected key is an error), preprocesses the image with the folder's own image processor, and
computes the logits of the same ids with the prefix-LM token_type_ids. It prints max |Δ| between
the two implementations' log-softmax of the logits at the scored positions (log-probabilities
of the suffix tokens, and of the whole vocabulary row from transformers for reference).

Not run by CI (needs Python with transformers 5.24, tools/requirements.txt).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, PaliGemmaForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent


def ours(binary, folder, image, prompt, suffix, adapter):
    extra = ["--adapter", adapter] if adapter else []
    out = subprocess.run(
        [binary, "score", "--model", folder, "--image", image, "--prompt", prompt,
         "--suffix", suffix, "--json"] + extra,
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def theirs(folder, image, ids, prefix_len, adapter):
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"transformers reports loading problems: {bad}")
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        loaded = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
        print(f"PEFT attached {loaded} adapter tensors")
    model.eval()
    pixels = AutoImageProcessor.from_pretrained(folder)(
        Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    inputs = torch.tensor([ids[:-1]])
    token_type_ids = torch.tensor([[0 if t < prefix_len else 1 for t in range(len(ids) - 1)]])
    with torch.no_grad():
        logits = model(input_ids=inputs, pixel_values=pixels, token_type_ids=token_type_ids,
                       attention_mask=torch.ones_like(inputs)).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    rows = logprobs[prefix_len - 1:len(ids) - 1]
    targets = torch.tensor(ids[prefix_len:])
    return rows.gather(1, targets[:, None])[:, 0].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--image", default=str(ROOT / "tests/fixtures/models/pg1-56/image_a.png"))
    p.add_argument("--prompt", default="caption en")
    p.add_argument("--suffix", default="a red circle")
    p.add_argument("--bin", default=str(ROOT / "target/debug/paligemma"))
    p.add_argument("--adapter", help="a LoRA adapter folder to apply on top of FOLDER")
    a = p.parse_args()
    r = ours(a.bin, a.folder, a.image, a.prompt, a.suffix, a.adapter)
    ref = theirs(a.folder, a.image, r["input_ids"], r["prefix_length"], a.adapter)
    delta = max(abs(x - y) for x, y in zip(r["logprobs"], ref))
    print(f"tokens {r['tokens']}")
    print(f"ours         {[round(x, 6) for x in r['logprobs']]}")
    print(f"transformers {[round(x, 6) for x in ref]}")
    print(f"max |Δ| log-probability = {delta:.3e}")
    sys.exit(0 if delta < 1e-4 else 1)


if __name__ == "__main__":
    main()
