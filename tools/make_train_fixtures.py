#!/usr/bin/env python
"""Reference losses, gradients and AdamW steps from PyTorch for the Rust fine-tuning core.

Usage:
    venv/bin/python tools/make_train_fixtures.py tests/fixtures/train

Pinned environment: tools/requirements.txt (torch 2.15.0 CPU, transformers 5.24.0). CI never runs
this script; `tests/train_parity.rs` reads what it writes.

It loads the tiny random checkpoints of tests/fixtures/models (written by make_model_fixtures.py) in
fp32 with eager attention, builds a 2-example batch through the real PaliGemmaProcessor with
`suffix=` and right padding (as fine-tuning recipes pad), and computes the fine-tuning loss of
big_vision's trainer: mean of -log p over each example's suffix tokens and <eos>, then the mean
over the batch (HF's own `labels=` loss, a mean over all the batch's tokens, is recorded beside it).

For every case it writes `<case>.safetensors` (f32 / i64):
  input_ids, token_type_ids, attention_mask, labels [2, L]   the processor's batch
  grad.<name>              d loss / d parameter, Hub names (vision_tower.vision_model.*, ...),
                           for the parameters of `grad_selection` in the JSON
and for the optimizer case (pg1-56) also
  <selection>.<name>       every trained parameter after 3 AdamW steps fed fixed gradients
                           (below), selection attn/llm/all
and `<case>.json` with the examples, the losses, the optimizer settings and per-step logs.

Two AdamW runs per selection, each with only the selection's parameters requiring grad, 3 steps
of clip_grad_norm_(1.0), AdamW.step, scheduler.step with get_cosine_schedule_with_warmup(warmup 2,
total 10) (learning rate 0 at step 0, then peak/2, then peak):
  - fixed gradients: every step is given the gradients `grad.*` of the initial weights, so the
    optimizer is checked alone (the final weights are stored);
  - training: every step computes the loss and gradients at the current weights (per-step loss,
    gradient norm and learning rate, and the loss at the final weights, are stored). Its weights
    are not stored: Adam divides each gradient element by its own magnitude, so elements whose
    gradient is f32 noise (the SigLIP key biases, whose true gradient is exactly 0) take updates
    of ±lr that differ between any two implementations.

Deterministic: single-threaded torch, fixed inputs; re-running gives byte-identical files.
"""
import argparse
import hashlib
import json
import os
import re
import sys

import torch
import transformers
import safetensors.torch
from transformers import get_cosine_schedule_with_warmup
from transformers.image_utils import load_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_model_fixtures as mmf  # noqa: E402  (processor and model loading, shared)

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")

# Two examples with different prefix and suffix lengths (7 and 3 scored tokens with <eos>).
EXAMPLES = [
    ("caption en", "a red circle on the left"),
    ("answer en what color is the circle?", "red"),
]

# Images per example, relative to tests/fixtures/models.
CASES = [
    dict(name="pg1-56", images=[["pg1-56/image_a.png"], ["pg1-56/image_b.png"]],
         grad_selection="all", optimizer=True),
    dict(name="pg2-42", images=[["pg2-42/image_c.png"], ["pg1-56/image_a.png"]],
         grad_selection="all", optimizer=False),
    # Two images per example; gradients of the attention projections only, to keep it small.
    dict(name="pg2-56-2img", images=[["pg2-56-2img/image_d.png", "pg2-56-2img/image_e.png"],
                                     ["pg2-56-2img/image_e.png", "pg2-56-2img/image_d.png"]],
         grad_selection="attn", optimizer=False),
]

SELECTIONS = ["attn", "llm", "all"]
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
WARMUP_STEPS, TOTAL_STEPS, STEPS = 2, 10, 3
MAX_GRAD_NORM = 1.0


def hub_name(name):
    """transformers 5.x in-memory parameter name -> the Hub name the Rust crate uses."""
    name = name.removeprefix("model.")
    if name.startswith("language_model."):
        return "language_model.model." + name.removeprefix("language_model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


ATTN = re.compile(r"^language_model\.model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight$")


def selected(name, selection):
    """The trained parameter sets, as src/train/params.rs defines them."""
    if selection == "attn":
        return bool(ATTN.match(name))
    if selection == "llm":
        return name.startswith("language_model.")
    if selection == "all":
        return True
    raise ValueError(selection)


def build_batch(case_dir, images, examples):
    processor = mmf.load_processor(case_dir)
    processor.tokenizer.padding_side = "right"
    pics = [[load_image(os.path.join(MODELS, f)) for f in files] for files in images]
    texts = [mmf.processor_text(prompt, len(files)) for (prompt, _), files in zip(examples, images)]
    batch = processor(text=texts, images=pics, suffix=[s for _, s in examples], padding="longest",
                      return_tensors="pt")
    return dict(batch)


def per_example_loss(model, batch):
    """big_vision's loss: mean -log p over each example's scored tokens, then mean over examples.
    Also returns HF's own loss (mean over all scored tokens of the batch)."""
    out = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"],
                labels=batch["labels"])
    logits = out.logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * scored
    per_example = -token_logp.sum(1) / scored.sum(1)
    return per_example.mean(), per_example, out.loss


def named(model):
    return [(hub_name(n), p) for n, p in model.named_parameters()]


def trainable(case_dir, selection):
    """A fresh model whose selected parameters require grad, its AdamW and its schedule."""
    model = mmf.load_model(case_dir)
    params = []
    for name, p in named(model):
        p.requires_grad_(selected(name, selection))
        if p.requires_grad:
            params.append((name, p))
    opt = torch.optim.AdamW([p for _, p in params], **ADAMW)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=WARMUP_STEPS, num_training_steps=TOTAL_STEPS)
    return model, params, opt, sched


def fixed_gradient_run(case_dir, grads, selection):
    """The optimizer alone: STEPS AdamW steps, each given the same gradients (the batch's at the
    initial weights), clipped first. Returns the final weights."""
    _, params, opt, sched = trainable(case_dir, selection)
    log = []
    for _ in range(STEPS):
        for name, p in params:
            p.grad = grads[name].clone()        # clipping scales .grad in place
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], MAX_GRAD_NORM)
        log.append(dict(grad_norm=norm.item(), lr=sched.get_last_lr()[0]))
        opt.step()
        sched.step()
    final = {f"{selection}.{n}": p.detach().clone() for n, p in params}
    return final, log, sum(p.numel() for _, p in params)


def training_run(case_dir, batch, selection):
    """Real training: STEPS steps of loss, backward, clipping, AdamW; then the loss at the final
    weights."""
    model, params, opt, sched = trainable(case_dir, selection)
    log = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss, _, _ = per_example_loss(model, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], MAX_GRAD_NORM)
        log.append(dict(loss=loss.item(), grad_norm=norm.item(), lr=sched.get_last_lr()[0]))
        opt.step()
        sched.step()
    with torch.no_grad():
        final_loss = per_example_loss(model, batch)[0].item()
    return dict(steps=log, final_loss=final_loss)


def run_case(case, out_dir):
    case_dir = os.path.join(MODELS, case["name"])
    batch = build_batch(case_dir, case["images"], EXAMPLES)
    model = mmf.load_model(case_dir)
    model.train()       # no dropout in PaliGemma's configs; train() only to be the training path
    loss, per_example, hf_loss = per_example_loss(model, batch)
    loss.backward()

    tensors = {k: batch[k].to(torch.int64).contiguous()
               for k in ["input_ids", "token_type_ids", "attention_mask", "labels"]}
    for name, p in named(model):
        if selected(name, case["grad_selection"]):
            tensors[f"grad.{name}"] = p.grad.detach().clone().contiguous()

    # Batch of one: the per-example and per-token means coincide.
    single = build_batch(case_dir, case["images"][:1], EXAMPLES[:1])
    with torch.no_grad():
        single_loss, _, single_hf = per_example_loss(mmf.load_model(case_dir), single)
    assert abs(single_loss.item() - single_hf.item()) < 1e-6

    info = dict(
        examples=[dict(prompt=p, suffix=s, images=files) for (p, s), files in zip(EXAMPLES, case["images"])],
        padding_side="right",
        loss=loss.item(),
        per_example_loss=per_example.tolist(),
        hf_token_mean_loss=hf_loss.item(),
        single_example_loss=single_loss.item(),
        scored_tokens=(batch["labels"] != -100).sum(1).tolist(),
        grad_selection=case["grad_selection"],
    )
    if case["optimizer"]:
        info["adamw"] = dict(lr=ADAMW["lr"], beta1=ADAMW["betas"][0], beta2=ADAMW["betas"][1], eps=ADAMW["eps"],
                             weight_decay=ADAMW["weight_decay"], max_grad_norm=MAX_GRAD_NORM,
                             warmup_steps=WARMUP_STEPS, total_steps=TOTAL_STEPS, steps=STEPS,
                             schedule="transformers.get_cosine_schedule_with_warmup")
        info["runs"] = {}
        grads = {name: p.grad.detach().clone() for name, p in named(model)}
        for selection in SELECTIONS:
            final, log, count = fixed_gradient_run(case_dir, grads, selection)
            tensors.update(final)
            info["runs"][selection] = dict(trained_parameters=count, fixed_gradients=log,
                                           training=training_run(case_dir, batch, selection))
    info["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)

    safetensors.torch.save_file(tensors, os.path.join(out_dir, f"{case['name']}.safetensors"))
    mmf.write_json(os.path.join(out_dir, f"{case['name']}.json"), info)
    print(f"{case['name']}: loss {info['loss']:.6f} (HF token mean {info['hf_token_mean_loss']:.6f}), "
          f"per example {info['per_example_loss']}")
    for selection, run in info.get("runs", {}).items():
        t = run["training"]
        print(f"  {selection}: {run['trained_parameters']} parameters, "
              + ", ".join(f"loss {s['loss']:.6f} norm {s['grad_norm']:.4f} lr {s['lr']:.2e}" for s in t["steps"])
              + f", final loss {t['final_loss']:.6f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("out", help="output folder, e.g. tests/fixtures/train")
    args = ap.parse_args()
    if transformers.__version__ != "5.24.0":
        print(f"warning: transformers {transformers.__version__}, fixtures are pinned to 5.24.0", file=sys.stderr)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    os.makedirs(args.out, exist_ok=True)
    for case in CASES:
        run_case(case, args.out)
    for f in sorted(os.listdir(args.out)):
        p = os.path.join(args.out, f)
        os.chmod(p, 0o644)
        print(f"  {hashlib.sha256(open(p, 'rb').read()).hexdigest()[:16]}  {os.path.getsize(p):>8}  {p}")


if __name__ == "__main__":
    main()
