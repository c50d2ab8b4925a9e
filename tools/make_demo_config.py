#!/usr/bin/env python3
"""Writes models/demo-init/: the configuration and tokenizer of the demo PaliGemma, which
`paligemma train --init models/demo-init` trains from scratch on `paligemma shapes` data
(tools/train_demo.sh runs the whole recipe).

The model is PaliGemma 1 in miniature: a 4-layer SigLIP (112 px, 14 px patches, 64 image tokens)
and a 4-layer Gemma 1 with multi-query attention. The tokenizer is Gemma-style (BPE over
"▁"-joined words, byte fallback with all 256 <0xNN> pieces, so any text encodes) with a small
vocabulary learned from the shapes task text, followed by PaliGemma's <loc0000>..<loc1023>,
<seg000>..<seg127> and <image> (the last id, as in the real tokenizer).

Needs only the `tokenizers` package (pip install tokenizers==0.23.3); the output is committed,
so nothing else runs this script.
"""

import argparse
import json
import os
import string

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
PAD, EOS, BOS = 0, 1, 2
BYTES = [f"<0x{b:02X}>" for b in range(256)]
LOC_BINS, SEG_CODES = 1024, 128
# Pieces learned by BPE (alphabet plus merges), after the specials and the byte pieces.
LEARNED = 400

KINDS = ["circle", "square", "triangle", "star", "hexagon"]
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "brown",
           "pink", "grey", "gray", "cyan"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "0", "1", "2", "3", "4", "5"]
# The task text the demo model sees (prompts of every task, in every form `shapes` writes), and a
# little general English so other prompts still split into pieces rather than bytes.
CORPUS = (
    ["caption en", "describe en", "ocr", "answer en how many shapes are there?",
     "answer en what colour is the circle?", "answer en what color is the circle?"]
    + [f"answer en how many {k}s are there?" for k in KINDS]
    + [f"answer en what colour is the {k}?" for k in KINDS]
    + [f"detect {k}" for k in KINDS] + [f"segment {k}" for k in KINDS]
    + [" ; ".join(KINDS), "detect " + " ; ".join(KINDS)]
    + [f"a {c} {k}" for c in COLOURS for k in KINDS]
    + [f"an {c} {k}" for c in COLOURS for k in KINDS]
    + [f"{n} {c} {k}s" for n in NUMBERS for c in COLOURS for k in KINDS]
    + ["a red circle, two blue squares and an orange star", "a green triangle and a pink hexagon"]
) * 4 + [
    "The quick brown fox jumps over the lazy dog. There are two shapes in the image: a red circle "
    "and a green triangle on a pale background.",
    "A photo of a small house with a red roof, trees around it and a blue sky with white clouds.",
    "What is written on the sign? Where is the person standing? Which animal is shown here?",
    "caption es", "caption fr", "caption de", "answer en what is in the image?",
    "question en", "left right top bottom middle center above below next to",
]
ALPHABET = list(string.ascii_lowercase + string.ascii_uppercase + string.digits
                + ".,?!'\":;-()/&%+=*#@_[]<>") + ["▁"]

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              image_size=112, patch_size=14)
TEXT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=1, head_dim=48)


def build_tokenizer():
    """BPE trained on CORPUS, then rebuilt with the byte pieces at ids 5..260 (byte fallback needs
    them in the vocabulary), then the added tokens: "\\n", loc, seg, <image>."""
    trainer_tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", behavior="merged_with_next"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=LEARNED, special_tokens=[], initial_alphabet=ALPHABET,
                                  limit_alphabet=len(ALPHABET), min_frequency=1, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    order = sorted(learned["vocab"].items(), key=lambda kv: kv[1])

    vocab = {t: i for i, t in enumerate(SPECIAL + BYTES)}
    for piece, _ in order:
        vocab.setdefault(piece, len(vocab))
    vocab.setdefault("\n", len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                          fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL])
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    extras = [f"<loc{i:04d}>" for i in range(LOC_BINS)] + [f"<seg{i:03d}>" for i in range(SEG_CODES)]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extras])
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", BOS)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])

    base = len(vocab)
    assert tok.token_to_id("<loc0000>") == base, (tok.token_to_id("<loc0000>"), base)
    assert tok.token_to_id("<image>") == base + LOC_BINS + SEG_CODES
    # Prompts start with the task word; answers and labels follow a space.
    for text in (["caption", "detect", "answer", " how", " many", " colour"]
                 + [" " + w for w in KINDS + COLOURS[:7]]):
        assert len(tok.encode(text, add_special_tokens=False).ids) == 1, text
    return tok


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "demo-init"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tok = build_tokenizer()
    tok.save(os.path.join(args.out, "tokenizer.json"), pretty=False)
    image_id = tok.token_to_id("<image>")
    vocab_rows = (image_id + 1 + 63) // 64 * 64        # padded to a multiple of 64, as Gemma's
    tokens = (VISION["image_size"] // VISION["patch_size"]) ** 2

    write_json(os.path.join(args.out, "config.json"), {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
        "image_token_index": image_id,
        "hidden_size": 2048,
        "projection_dim": TEXT["hidden_size"],
        "torch_dtype": "float32",
        "text_config": dict(model_type="gemma", vocab_size=vocab_rows, num_image_tokens=tokens,
                            hidden_activation="gelu_pytorch_tanh", torch_dtype="float32", **TEXT),
        "vision_config": dict(model_type="siglip_vision_model", projection_dim=TEXT["hidden_size"],
                              num_image_tokens=tokens, vision_use_head=False, **VISION),
    })
    write_json(os.path.join(args.out, "generation_config.json"),
               {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    write_json(os.path.join(args.out, "preprocessor_config.json"), {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_seq_length": tokens,
        "processor_class": "PaliGemmaProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": VISION["image_size"], "width": VISION["image_size"]},
    })
    write_json(os.path.join(args.out, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "mask_token": "<mask>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_special_tokens": ["<image>"],
        "processor_class": "PaliGemmaProcessor", "tokenizer_class": "GemmaTokenizer",
    })
    print(f"wrote {args.out}: vocabulary {image_id + 1} ({vocab_rows} embedding rows), "
          f"{tokens} image tokens")


if __name__ == "__main__":
    main()
