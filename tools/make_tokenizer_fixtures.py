#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer/cases.json: reference token ids and decodes for the Rust tokenizer.

The reference is the Python `tokenizers` library on tests/data/paligemma-tokenizer.json, called
exactly as PaliGemmaProcessor does (no special tokens added: the processor forces add_bos/add_eos
off and writes `<bos>` into the string itself).

Run from the repository root:  venv/bin/python tools/make_tokenizer_fixtures.py
The output is deterministic: every string is listed here or drawn from a seeded RNG.
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER = ROOT / "tests/data/paligemma-tokenizer.json"
DEFAULT_OUT = ROOT / "tests/fixtures/tokenizer/cases.json"

IMAGE_ID = 257152
BOS_ID = 2

# PaliGemma's task prefixes as the mix checkpoints expect them (big_vision / model cards).
ENGLISH_PROMPTS = [
    "caption en",
    "caption es",
    "cap en",
    "caption",
    "describe en",
    "ocr",
    "ocr\n",
    "answer en what is the man holding?",
    "answer en what color is the car?",
    "answer en how many dogs are in the picture?",
    "answer en Is there a cat?",
    "answer en where is the cat standing?",
    "answer en What does the sign say?",
    "answer en what is written on the blackboard?",
    "answer en What's the weather like?",
    "answer en Who is in the photo? Describe them.",
    "question en What is this?",
    "detect cat",
    "detect cat ; dog",
    "detect cat ; dog ; person ; car",
    "detect red car",
    "detect traffic light ; stop sign",
    "detect the man wearing a hat",
    "segment the car",
    "segment cat",
    "segment cat ; dog",
    "segment the left-most person",
    "caption en\n",
    "answer en what is in the image?\n",
    "Where is the cat standing?",
    "Where is the cat standing?\nsnow",
    "What is the answer to 2+2?",
    "A photo of a dog running on the beach.",
    "a cat sitting on a red sofa next to a window",
    "Two people riding bicycles down a tree-lined street at sunset.",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "It's a dog's life; isn't it?",
    "\"quoted\" and 'single quoted' and `backticked`",
    "e-mail: someone@example.com, url: https://example.com/a/b?c=d&e=f#g",
    "semicolons;without;spaces;detect",
    "mixed CASE, Punctuation!!! ??? ... --- ___",
    "point to the cat",
    "caption en <image>",
    "<image>caption en",
]

# One caption-like phrase and one question per language: PaliGemma's 35 captioning languages
# (XM3600) plus other scripts the Gemma vocabulary covers.
LANG_PHRASES = {
    "ar": ["قطة تجلس على أريكة حمراء", "ما لون السيارة؟", "مرحبا بالعالم"],
    "bn": ["একটি বিড়াল লাল সোফায় বসে আছে", "গাড়িটির রং কী?"],
    "cs": ["Kočka sedí na červené pohovce", "Jakou barvu má auto?", "Příliš žluťoučký kůň úpěl ďábelské ódy."],
    "da": ["En kat sidder på en rød sofa", "Hvilken farve har bilen?", "Blåbærsyltetøj og rødgrød med fløde"],
    "de": ["Eine Katze sitzt auf einem roten Sofa", "Welche Farbe hat das Auto?", "Größenmaßstäbe über Straßenüberführungen"],
    "el": ["Μια γάτα κάθεται σε έναν κόκκινο καναπέ", "Τι χρώμα έχει το αυτοκίνητο;", "Καλημέρα κόσμε"],
    "en": ["A cat sits on a red sofa", "What color is the car?"],
    "es": ["Un gato sentado en un sofá rojo", "¿De qué color es el coche?", "¡Qué niño tan pequeño! Mañana será otro día."],
    "fa": ["گربه‌ای روی مبل قرمز نشسته است", "ماشین چه رنگی است؟"],
    "fi": ["Kissa istuu punaisella sohvalla", "Minkä värinen auto on?", "Hyvää päivää, mitä kuuluu?"],
    "fil": ["Isang pusa na nakaupo sa pulang sopa", "Anong kulay ng kotse?"],
    "fr": ["Un chat assis sur un canapé rouge", "De quelle couleur est la voiture ?", "Où est l'élève ? Ça va très bien, merci."],
    "hi": ["एक बिल्ली लाल सोफे पर बैठी है", "कार किस रंग की है?", "नमस्ते दुनिया"],
    "hr": ["Mačka sjedi na crvenom kauču", "Koje je boje automobil?", "Čađava žaba i šćućurena ćuk"],
    "hu": ["Egy macska ül egy piros kanapén", "Milyen színű az autó?", "Árvíztűrő tükörfúrógép"],
    "id": ["Seekor kucing duduk di sofa merah", "Apa warna mobil itu?"],
    "it": ["Un gatto seduto su un divano rosso", "Di che colore è la macchina?", "Perché è così più caro?"],
    "iw": ["חתול יושב על ספה אדומה", "באיזה צבע המכונית?", "שָׁלוֹם עוֹלָם"],
    "ja": ["赤いソファに座っている猫", "車は何色ですか？", "ひらがなとカタカナと漢字", "東京タワーの写真です。"],
    "ko": ["빨간 소파에 앉아 있는 고양이", "자동차는 무슨 색인가요?", "안녕하세요 세계"],
    "mi": ["He ngeru e noho ana i runga i te hōpa whero", "He aha te tae o te motokā?"],
    "nl": ["Een kat zit op een rode bank", "Welke kleur heeft de auto?", "Ĳsselmeer en ijsjes"],
    "no": ["En katt sitter på en rød sofa", "Hvilken farge har bilen?", "Ærlig talt, øl på Østlandet"],
    "pl": ["Kot siedzi na czerwonej kanapie", "Jakiego koloru jest samochód?", "Zażółć gęślą jaźń"],
    "pt": ["Um gato sentado num sofá vermelho", "Qual é a cor do carro?", "Não há ações à venda, avô."],
    "quz": ["Huk michi puka tiyanapi tiyashan", "Ima llimpim carro?"],
    "ro": ["O pisică stă pe o canapea roșie", "Ce culoare are mașina?", "Știința și țara își împărtășesc"],
    "ru": ["Кошка сидит на красном диване", "Какого цвета машина?", "Съешь же ещё этих мягких французских булок"],
    "sv": ["En katt sitter på en röd soffa", "Vilken färg har bilen?", "Flygande bäckasiner söka hwila på mjuka tuvor"],
    "sw": ["Paka ameketi kwenye sofa nyekundu", "Gari lina rangi gani?"],
    "te": ["ఎరుపు సోఫాపై కూర్చున్న పిల్లి", "కారు ఏ రంగులో ఉంది?"],
    "th": ["แมวนั่งอยู่บนโซฟาสีแดง", "รถสีอะไร", "สวัสดีครับ"],
    "tr": ["Kırmızı bir kanepede oturan bir kedi", "Araba ne renk?", "Pijamalı hasta yağız şoföre çabucak güvendi."],
    "uk": ["Кіт сидить на червоному дивані", "Якого кольору машина?", "Ґанок і їжак, що з'їв яйце"],
    "vi": ["Một con mèo ngồi trên ghế sofa màu đỏ", "Chiếc xe màu gì?", "Tiếng Việt có dấu: ă â đ ê ô ơ ư"],
    "zh": ["一只猫坐在红色的沙发上", "汽车是什么颜色的？", "你好，世界！", "這是繁體中文。"],
    # Further scripts, not PaliGemma captioning languages.
    "ka": ["კატა წითელ დივანზე ზის", "გამარჯობა მსოფლიო"],
    "hy": ["Կատուն նստած է կարմիր բազմոցին", "Բարև աշխարհ"],
    "ta": ["சிவப்பு சோபாவில் ஒரு பூனை அமர்ந்திருக்கிறது", "வணக்கம் உலகம்"],
    "am": ["ድመት በቀይ ሶፋ ላይ ተቀምጣለች", "ሰላም ለዓለም"],
    "km": ["ឆ្មាអង្គុយលើសាឡុងក្រហម", "សួស្តីពិភពលោក"],
    "si": ["රතු සෝෆාවක් මත බළලෙක් වාඩි වී සිටී", "ආයුබෝවන්"],
    "my": ["ကြောင်တစ်ကောင် အနီရောင်ဆိုဖာပေါ်တွင် ထိုင်နေသည်", "မင်္ဂလာပါ"],
    "gu": ["લાલ સોફા પર બેઠેલી બિલાડી", "નમસ્તે"],
    "pa": ["ਲਾਲ ਸੋਫੇ 'ਤੇ ਬੈਠੀ ਬਿੱਲੀ", "ਸਤ ਸ੍ਰੀ ਅਕਾਲ"],
    "kn": ["ಕೆಂಪು ಸೋಫಾದ ಮೇಲೆ ಕುಳಿತಿರುವ ಬೆಕ್ಕು", "ನಮಸ್ಕಾರ"],
    "ml": ["ചുവന്ന സോഫയിൽ ഇരിക്കുന്ന പൂച്ച", "നമസ്കാരം"],
    "lo": ["ແມວນັ່ງຢູ່ເທິງໂຊຟາສີແດງ", "ສະບາຍດີ"],
    "bo": ["བཀྲ་ཤིས་བདེ་ལེགས།"],
    "mn": ["ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ", "Улаан буйдан дээр суусан муур"],
    "ur": ["ایک بلی سرخ صوفے پر بیٹھی ہے", "گاڑی کس رنگ کی ہے؟"],
    "yi": ["אַ קאַץ זיצט אויף אַ רויטער סאָפע"],
    "cy": ["Mae cath yn eistedd ar soffa goch", "Ŵyn a ŷd ar ŵyl"],
    "is": ["Köttur situr á rauðum sófa", "Þú ert ánægð með þetta"],
    "eo": ["Ĉu vi parolas Esperanton? Eĥoŝanĝo ĉiuĵaŭde"],
}

EMOJI = [
    "😀",
    "😀😃😄😁",
    "a cat 🐱 and a dog 🐶",
    "👍🏽",
    "👩‍👩‍👧‍👦",
    "👨‍💻 coding",
    "🏳️‍🌈",
    "🏴‍☠️",
    "🇺🇸🇯🇵🇩🇪🇫🇷",
    "🇬🇧 flag",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
    "❤️",
    "☺︎ text ☺️ emoji",
    "1️⃣2️⃣#️⃣",
    "🧑🏿‍🦱",
    "🫠🫶🪿",
    "detect 🐱 ; 🐶",
    "caption en 🌅",
    "𝕳𝖊𝖑𝖑𝖔 𝔀𝓸𝓻𝓵𝓭",
    "𐍈 gothic 𓂀 hieroglyph",
    "🀄🃏🎴",
]

WHITESPACE = [
    " ",
    "  ",
    "   ",
    " " * 16,
    " " * 31,
    " " * 33,
    " " * 100,
    "\t",
    "\t\t",
    "\t\t\t\t\t\t\t\t",
    "\n",
    "\n\n",
    "\n\n\n\n\n",
    "\r\n",
    "\r\n\r\n",
    "\r",
    " leading space",
    "trailing space ",
    "  two leading",
    "two trailing  ",
    " both ",
    "multiple   spaces   between   words",
    "tab\tseparated\tvalues",
    "line one\nline two\nline three",
    "windows\r\nline\r\nendings",
    "mixed \t \n \r\n whitespace",
    "\n leading newline",
    "trailing newline\n",
    "trailing newlines\n\n",
    " \n",
    "\n ",
    "\u00a0non-breaking\u00a0space",
    "em\u2003space and thin\u2009space",
    "zero\u200bwidth\u200bspace",
    "ideographic\u3000space",
    "\u2028line separator\u2029paragraph separator",
    "\u000bvertical tab\u000cform feed",
    "▁already▁has▁metaspace",
    "▁",
    "▁▁",
    " ▁ ",
]

CONTROL = [
    "\x00",
    "a\x00b",
    "\x00\x00\x00",
    "\x01\x02\x03\x04\x05\x06\x07\x08",
    "\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e\x1f",
    "escape \x1b[31mred\x1b[0m",
    "bell\x07",
    "delete\x7f",
    "c1 \x80\x85\x9f controls",
    "\ufeffbyte order mark",
    "\ufffd replacement char",
    "\ufffd\ufffd",
    "soft\u00adhyphen",
    "right\u200fto\u200eleft marks",
    "\u202eoverride\u202c",
    "private use \ue000\uf8ff",
    "\U000f0000 plane 15",
    "noncharacter \ufdd0",
    "\U0010ffff",
]

COMBINING = [
    "e\u0301",
    "e\u0301\u0302\u0303",
    "Zalgo: Z\u0351\u036b\u0343a\u0362\u0355l\u0355\u0354g\u0316\u0359o\u0334",
    "n\u0303 vs \u00f1",
    "A\u030a vs \u00c5 vs \u212b",
    "\u1100\u1161\u11a8 conjoining jamo",
    "\u0915\u094d\u0937 devanagari conjunct",
    "\u0e01\u0e34\u0e4a thai stacked",
    "a\u20dd enclosing",
    "\u0301 lone combining",
    "\u05e9\u05c1\u05b8 hebrew points",
    "\u0628\u0650\u0633\u0652\u0645\u0650 arabic harakat",
    "ﬁ ligature ﬀ ﬂ",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "ｶﾀｶﾅ halfwidth",
    "①②③ circled ⑴⑵ parenthesized",
    "x\u00b2 + y\u00b3 = z\u2074",
]

DIGITS = [
    "0",
    "7",
    "42",
    "123",
    "1234",
    "2024-06-01",
    "3.14159265358979323846264338327950288419716939937510",
    "1,000,000",
    "1e-10",
    "-273.15°C",
    "0x1F600",
    "+1 (555) 123-4567",
    "١٢٣٤٥ arabic-indic",
    "०१२३४५ devanagari",
    "一二三 四五六",
    "Ⅰ Ⅱ Ⅲ Ⅳ roman",
    "12:30pm, 1/2, 3/4, 50%",
    "99999999999999999999",
    "answer en how many? 3",
    "0000",
    "loc0123",
    "1023",
]

CODE = [
    "def f(x):\n    return x * 2\n",
    "fn main() {\n\tprintln!(\"{}\", 1 + 1);\n}",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] << 2; }",
    "SELECT * FROM users WHERE id = 42;",
    "<div class=\"box\">Hello &amp; goodbye</div>",
    "{\"key\": [1, 2, {\"nested\": null}]}",
    "x => x ** 2 // comment",
    "$ cargo test --release -- --nocapture",
    "#include <stdio.h>",
    "if a != b && c <= d || !e { return; }",
    "path/to/file.rs:12:34",
    "C:\\Windows\\System32\\drivers\\etc\\hosts",
    "regex: ^[a-z0-9_]+@[a-z]+\\.[a-z]{2,}$",
    "\\n is not a newline here",
    "\"\\u00e9\" escaped",
    "lambda: None",
    "<html><body><p>text</p></body></html>",
    "a<b>c</b>d",
    "<unk>",
    "<mask>",
    "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n",
    "<unused0><unused1>",
    "[@BOS@]",
    "<2mass>",
]

LONG = [
    "a" * 200,
    "ab" * 150,
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
    "x" * 1000,
    "supercalifragilisticexpialidocious" * 5,
    "猫" * 100,
    "😀" * 50,
    "-" * 80,
    "=" * 64,
    ".....................................",
    "!!!!!!!!!!!!!!!!!!!!??????????????????",
    "https://www.example.com/" + "very/long/path/" * 10 + "index.html",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "The " * 60,
]

SPECIAL_INLINE = [
    "<loc0123>",
    "<seg045>",
    "<image>",
    "<bos>",
    "<eos>",
    "<pad>",
    "<loc0000>",
    "<loc1023>",
    "<seg000>",
    "<seg127>",
    "a<loc0123>b",
    "a <loc0123> b",
    " <loc0123> ",
    "<loc0123><loc0456><loc0789><loc1000>",
    "<loc0123> <loc0456> <loc0789> <loc1000>",
    "cat<seg045>dog",
    "<seg045><seg001>",
    "<image><image><image><bos>caption en\n",
    "<image>" * 16 + "<bos>answer en what is this?\n",
    "text<image>text",
    "before<bos>after",
    "before <bos> after",
    "<eos>end",
    "answer<eos>",
    "yes<eos>",
    "<bos><eos><pad>",
    "<bos>\n",
    "\n<eos>",
    "<<loc0123>>",
    "<loc0123>>",
    "<<image>",
    "<image>>",
    "<im<image>age>",
    "<image >",
    "< image>",
    "<IMAGE>",
    "<Image>",
    "<bos >",
    "<BOS>",
    "<loc0123",
    "loc0123>",
    "<loc0123 >",
    "<LOC0123>",
    "\u00a0<loc0123>",
    "\t<seg045>\n",
    "<loc0123>\u00e9",
    "\u00e9<seg045>",
    "猫<loc0001>犬",
    "😀<image>😀",
    "detect cat ; dog\n<loc0100><loc0200><loc0300><loc0400> cat",
]

MALFORMED = [
    "<loc123>",
    "<loc12345>",
    "<loc10000>",
    "<loc1024>",
    "<loc9999>",
    "<loc-001>",
    "<loc 0123>",
    "<loc0x12>",
    "<loc>",
    "<loc0>",
    "<loc00000>",
    "<seg1000>",
    "<seg128>",
    "<seg45>",
    "<seg0045>",
    "<seg>",
    "<seg-01>",
    "<loc0123 cat",
    "<loc01２3>",
    "＜loc0123＞",
    "<loc0123/>",
    "</loc0123>",
    "<seg045/>",
    "<loc1023><loc1024>",
    "<seg127><seg128>",
    "<image/>",
    "<images>",
    "<imag>",
    "<bos/>",
    "<eos >",
    "<0x41>",
    "<0xE2><0x82><0xAC>",
    "<unused99>",
]


def detection_output(rng: random.Random, labels: list[str]) -> str:
    """A PaliGemma `detect` answer: four <locYYYY> (y0 x0 y1 x1) then the label, objects joined by ' ; '."""
    objects = []
    for label in labels:
        y0, x0 = rng.randrange(0, 900), rng.randrange(0, 900)
        y1, x1 = rng.randrange(y0 + 1, 1024), rng.randrange(x0 + 1, 1024)
        locs = "".join(f"<loc{v:04d}>" for v in (y0, x0, y1, x1))
        objects.append(f"{locs} {label}")
    return " ; ".join(objects)


def segmentation_output(rng: random.Random, labels: list[str]) -> str:
    """A PaliGemma `segment` answer: a detection box plus 16 <segNNN> codebook tokens per object."""
    objects = []
    for label in labels:
        box = detection_output(rng, [label]).rsplit(" ", 1)[0]
        segs = "".join(f"<seg{rng.randrange(128):03d}>" for _ in range(16))
        objects.append(f"{box}{segs} {label}")
    return " ; ".join(objects)


def model_outputs(rng: random.Random) -> list[str]:
    labels = [["cat"], ["cat", "dog"], ["person", "car", "traffic light"], ["red car"], ["猫"], ["chat noir"]]
    outs = [
        "<loc0100><loc0200><loc0300><loc0400> cat ; <loc0010><loc0020><loc0030><loc0040> dog",
        "<loc0000><loc0000><loc1023><loc1023> image",
        "<loc0100><loc0200><loc0300><loc0400><seg001><seg002><seg003><seg004><seg005><seg006>"
        "<seg007><seg008><seg009><seg010><seg011><seg012><seg013><seg014><seg015><seg016> car",
        "<loc0100><loc0200><loc0300><loc0400> cat<eos>",
        "snow",
        "A cat sitting on a sofa.",
        "2",
        "no",
    ]
    for group in labels:
        outs.append(detection_output(rng, group))
        outs.append(segmentation_output(rng, group))
    # The same outputs with the processor's prefix, as a decoded generate() result would show them.
    outs += [f"detect {' ; '.join(g)}\n{detection_output(rng, g)}" for g in labels[:3]]
    return outs


def language_prompts() -> list[str]:
    """Task prompts in each language: `caption xx`, `answer xx <question>`, and the bare phrases."""
    out = []
    for lang, phrases in LANG_PHRASES.items():
        out.append(f"caption {lang}")
        out.extend(phrases)
        questions = [p for p in phrases if p.rstrip().endswith(("?", "？", ";", "؟"))]
        out.extend(f"answer {lang} {q}" for q in questions)
        out.append(f"detect {phrases[0]}")
    return out


# Fragments the random mixer splices together, so the boundaries between scripts, specials,
# whitespace and byte-fallback characters are exercised in combinations nobody wrote by hand.
def fragment_pool() -> list[str]:
    pool = [p for phrases in LANG_PHRASES.values() for p in phrases]
    pool += EMOJI + COMBINING + DIGITS[:12]
    pool += [" ", "  ", "\n", "\t", "\r\n", "\x00", "<loc0007>", "<seg099>", "<image>", "<bos>", "<eos>"]
    pool += ["<loc77>", "<seg1000>", "▁", "\ufffd", "\u200d", "\ufe0f", "\U000e0067"]
    return pool


def random_mixes(rng: random.Random, count: int) -> list[str]:
    pool = fragment_pool()
    mixes = []
    for _ in range(count):
        parts = [rng.choice(pool) for _ in range(rng.randrange(2, 7))]
        seps = [rng.choice(["", "", " ", "\n"]) for _ in parts]
        mixes.append("".join(p + s for p, s in zip(parts, seps)))
    return mixes


def random_codepoints(rng: random.Random, count: int) -> list[str]:
    """Short strings of random scalar values from many blocks, mostly outside the vocabulary."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x590, 0x6FF), (0x900, 0xDFF), (0xE00, 0xEFF),
              (0x1100, 0x11FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
              (0x10000, 0x1FFFF), (0x20000, 0x2A6DF), (0xE0000, 0xE007F)]
    out = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randrange(1, 12)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randrange(lo, hi + 1)))
        out.append("".join(chars))
    return out


def random_id_sequences(rng: random.Random, vocab_size: int, count: int) -> list[list[int]]:
    """Id sequences for decode-only checks, including partial and invalid byte-fallback runs.

    Byte tokens <0x00>..<0xFF> are ids 217..472 in the Gemma vocabulary; a lone UTF-8 lead byte
    or a stray continuation byte must decode to U+FFFD the same way in Rust and Python.
    """
    byte_id = 217
    seqs = [
        [byte_id + 0xE2],
        [byte_id + 0xE2, byte_id + 0x82],
        [byte_id + 0xE2, byte_id + 0x82, byte_id + 0xAC],
        [byte_id + 0x82, byte_id + 0xAC],
        [byte_id + 0xF0, byte_id + 0x9F, byte_id + 0x98, byte_id + 0x80],
        [byte_id + 0xF0, byte_id + 0x9F, 235250, byte_id + 0x98, byte_id + 0x80],
        [byte_id + 0xFF, byte_id + 0xFE],
        # A valid character followed by a stray byte in the same run: the whole run is U+FFFD.
        [byte_id + 0xE2, byte_id + 0x82, byte_id + 0xAC, byte_id + 0x82],
        # Skipping a special token joins the byte runs on either side of it.
        [byte_id + 0xE2, IMAGE_ID, byte_id + 0x82, byte_id + 0xAC, 235250],
        [byte_id + 0xE2, byte_id + 0x82, byte_id + 0xAC, 1, byte_id + 0x82, byte_id + 0xAC],
        [2, 1, 0, 3, 4, IMAGE_ID, 256000, 257151, 108],
        # Ids past the tokenizer (the embedding's padding rows) decode to nothing.
        [235250, 257200, 257215, 300000, 235250],
        [],
    ]
    for _ in range(count):
        n = rng.randrange(1, 16)
        seq = []
        for _ in range(n):
            kind = rng.random()
            if kind < 0.3:
                seq.append(byte_id + rng.randrange(256))
            elif kind < 0.4:
                seq.append(rng.randrange(0, 217))
            else:
                seq.append(rng.randrange(vocab_size))
        seqs.append(seq)
    return seqs


def all_texts(rng: random.Random) -> list[str]:
    texts = (ENGLISH_PROMPTS + language_prompts() + EMOJI + WHITESPACE + CONTROL + COMBINING + DIGITS
             + CODE + LONG + SPECIAL_INLINE + MALFORMED + model_outputs(rng) + [""])
    texts += random_mixes(rng, 120)
    texts += random_codepoints(rng, 40)
    unique = list(dict.fromkeys(texts))
    return unique


def check_processor_layout(tok: Tokenizer, text: str, prompt_ids: list[int]) -> None:
    """The processor tokenizes `<image>*N<bos>prompt\\n` as one string; the added tokens split it,
    so the prompt part must equal the prompt tokenized alone. The Rust side relies on this."""
    full = tok.encode("<image>" * 3 + "<bos>" + text + "\n", add_special_tokens=False).ids
    expected = [IMAGE_ID] * 3 + [BOS_ID] + prompt_ids
    assert full == expected, (text, full, expected)


def encode_case(tok: Tokenizer, text: str) -> dict:
    ids = tok.encode(text, add_special_tokens=False).ids
    prompt_ids = tok.encode(text + "\n", add_special_tokens=False).ids
    check_processor_layout(tok, text, prompt_ids)
    return {
        "text": text,
        "ids": ids,
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        "prompt_ids": prompt_ids,
    }


def decode_case(tok: Tokenizer, ids: list[int]) -> dict:
    return {
        "ids": ids,
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
    }


def to_json(fixture: dict) -> str:
    """One case per line, so a regenerated fixture diffs case by case.

    ASCII escapes keep NUL, lone combining marks and bidi controls unambiguous in diffs.
    """
    lines = ["{"]
    for key, value in fixture.items():
        if isinstance(value, list):
            rows = ",\n".join("  " + json.dumps(v, ensure_ascii=True) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{rows}\n ],")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    tok = Tokenizer.from_file(str(args.tokenizer))
    rng = random.Random(20240514)
    texts = all_texts(rng)
    id_seqs = random_id_sequences(rng, tok.get_vocab_size(with_added_tokens=True), 60)

    fixture = {
        "generator": "tools/make_tokenizer_fixtures.py",
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_sha256": hashlib.sha256(args.tokenizer.read_bytes()).hexdigest(),
        "cases": [encode_case(tok, t) for t in texts],
        "decode_cases": [decode_case(tok, ids) for ids in id_seqs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(to_json(fixture))
    print(f"wrote {args.out}: {len(fixture['cases'])} cases, {len(fixture['decode_cases'])} decode cases")


if __name__ == "__main__":
    main()
