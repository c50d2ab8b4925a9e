#!/usr/bin/env python3
"""LoRA parity fixtures for tests/train_parity.rs (the `lora_*` tests).

    venv/bin/python tools/make_lora_fixtures.py tests/fixtures/train

On the tiny pg1-56 checkpoint and make_train_fixtures.py's 2-example batch: PEFT (peft 0.21)
wraps PaliGemmaForConditionalGeneration with LoRA (r=2, alpha=4, dropout 0, target_modules the
regex of src/train/lora.rs: the decoder layers' q/k/v/o/gate/up/down projections), A and B
are set to seeded random values (B non-zero so that A's gradients are not zero), and the
per-example-mean loss is backpropagated. Writes lora-pg1-56.safetensors: `adapter.{PEFT key}`
(exactly what PEFT's save_pretrained writes: the keys are checked against it), `grad.{PEFT
key}`, and `merged_logits` (logits of merge_and_unload() on the HF batch layout; not compared yet: its
positions differ from the Rust collation); and lora-pg1-56.json
(loss, r, alpha, target_modules, the module keys).
"""
import argparse
import os
import sys
import tempfile

import torch
import safetensors.torch
import peft

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_model_fixtures as mmf  # noqa: E402
import make_train_fixtures as mtf  # noqa: E402

R, ALPHA = 2, 4.0
TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
CASE = mtf.CASES[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    case_dir = os.path.join(mtf.MODELS, CASE["name"])
    batch = mtf.build_batch(case_dir, CASE["images"], mtf.EXAMPLES)
    base = mmf.load_model(case_dir)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                          target_modules=TARGET_REGEX)
    model = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    loss, per_example, _ = mtf.per_example_loss(model, batch)
    loss.backward()

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        saved = safetensors.torch.load_file(os.path.join(d, "adapter_model.safetensors"))
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            assert key in saved, key
            grads[key] = p.grad.detach().clone()
    assert set(grads) == set(saved), (set(saved) ^ set(grads))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in saved})

    with torch.no_grad():
        merged = model.merge_and_unload()
        logits = merged(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"]).logits.float()

    tensors = {f"adapter.{k}": v.contiguous() for k, v in saved.items()}
    tensors.update({f"grad.{k}": v.contiguous() for k, v in grads.items()})
    tensors["merged_logits"] = logits.contiguous()
    safetensors.torch.save_file(tensors, os.path.join(args.out, f"lora-{CASE['name']}.safetensors"))
    info = dict(case=CASE["name"], r=R, lora_alpha=ALPHA, target_modules=TARGET_REGEX,
                loss=loss.item(), per_example_loss=per_example.tolist(), modules=modules,
                versions=dict(torch=torch.__version__, peft=peft.__version__))
    mmf.write_json(os.path.join(args.out, f"lora-{CASE['name']}.json"), info)
    print(f"lora {CASE['name']}: loss {loss.item():.6f}, {len(modules)} modules, e.g. {sorted(saved)[0]}")


if __name__ == "__main__":
    main()
