"""Data for EVE: tokenizer, the synthetic shapes world, readers of the real formats, collate.

Bottom-up:
1. `WordPieceTokenizer`, a from-scratch BERT-uncased tokenizer (loads a BERT vocab.txt and tokenizes
   exactly like BERT), plus `build_vocab` to make a small vocabulary for a new corpus.
2. `load_image`: any PNG/JPEG mode -> normalised (3, S, S) tensor.
3. The "shapes world": seeded scenes of coloured shapes with captions, VQA questions and NLVR2
   statements that are true by construction, so pre-training and every fine-tuning task run with no
   download. `ensure_shapes_world(root)` writes it once.
4. Readers of the ALBEF/X-VLM JSON formats (pre-training, retrieval, VQA, NLVR2), one `Collator`
   and one DataLoader recipe (`make_loader`, `loader_set_epoch`) shared by all training scripts.

Bad input data raises `DataError` naming the file, the 0-based row and the problem; with
`skip_bad=True` bad rows are skipped and counted in `dataset.skipped` instead.
"""
import functools
import inspect
import itertools
import json
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler


class DataError(Exception):
    """A problem with input data (file, row, image); the message says where and what."""


# ----------------------------------------------------------------------------- tokenizer
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # build_vocab puts them first: [PAD] = 0
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


@functools.lru_cache(maxsize=None)  # text is mostly ASCII: classify each distinct char once
def _is_punct(ch):
    # BERT counts all non-alphanumeric ASCII as punctuation, even "$" and "^" (category S*)
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


@functools.lru_cache(maxsize=None)
def _clean_char(ch):
    """What BERT's text cleaning turns ch into: itself, a space, nothing, or a spaced CJK ideograph."""
    cat = unicodedata.category(ch)
    if ch in " \t\n\r" or cat == "Zs":
        return " "  # every whitespace char counts as a space
    if ord(ch) == 0 or ord(ch) == 0xFFFD or cat.startswith("C"):
        return ""  # NUL, replacement char and control chars are dropped
    if any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES):
        return f" {ch} "  # each ideograph is a word of its own
    return ch


def basic_tokenize(text):
    """BERT's BasicTokenizer with do_lower_case: clean, split CJK, lowercase, strip accents, split punct."""
    words = []
    for token in "".join(map(_clean_char, text)).split():
        token = unicodedata.normalize("NFD", token.lower())
        token = "".join(c for c in token if unicodedata.category(c) != "Mn")  # drop accents
        current = ""
        for c in token:
            if _is_punct(c):
                words += [current, c] if current else [c]
                current = ""
            else:
                current += c
        if current:
            words.append(current)
    return " ".join(words).split()  # BERT re-splits on whitespace after the punctuation split


class WordPieceTokenizer:
    """BERT-uncased tokenization: basic_tokenize, then greedy longest-match-first WordPiece."""

    def __init__(self, vocab, max_len=40):
        self.vocab = list(vocab)
        self.max_len = max_len
        self.token_to_id = {}
        for i, tok in enumerate(self.vocab):
            self.token_to_id.setdefault(tok, i)  # BERT keeps the first id of a duplicated token
        missing = [s for s in SPECIALS if s not in self.token_to_id]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self.token_to_id[s] for s in SPECIALS)
        self.special_ids = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}

    @classmethod
    def from_file(cls, path, max_len=40):
        """A BERT vocab.txt: one token per line, id = line number."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start another token
        return cls([line.rstrip("\r") for line in lines], max_len)

    def save(self, path):
        Path(path).write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")

    def __len__(self):
        return len(self.vocab)

    def _wordpiece(self, word):
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:  # longest piece in the vocabulary first
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.token_to_id:
                    break
                end -= 1
            else:
                return ["[UNK]"]  # one unmatched position makes the whole word unknown
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        return [p for word in basic_tokenize(text) for p in self._wordpiece(word)]

    def encode(self, text, max_len=None):
        """[CLS] pieces [SEP], truncated so that the length is <= max_len and [SEP] stays last."""
        max_len = max_len or self.max_len
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold [CLS] and [SEP], got {max_len}")
        ids = [self.token_to_id.get(p, self.unk_id) for p in self.tokenize(text)][: max_len - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def decode(self, ids):
        pieces = [self.vocab[int(i)] for i in ids if int(i) not in self.special_ids]
        return " ".join(pieces).replace(" ##", "")


def build_vocab(texts, min_freq=1, max_size=None):
    """Specials, whole words by frequency (ties alphabetical), then every seen character and its
    '##' form, so that any word made of seen characters tokenizes without [UNK]. max_size caps the
    total size by dropping the rarest multi-character words (characters are never dropped)."""
    counts = Counter()
    for text, n in Counter(texts).items():  # corpora repeat texts: tokenize each distinct one once
        counts.update({w: c * n for w, c in Counter(basic_tokenize(text)).items()})
    chars = sorted({c for w in counts for c in w})
    char_tokens = chars + ["##" + c for c in chars]
    words = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
    longer = [w for w in words if len(w) > 1]  # single characters are always kept, below
    if max_size is not None:
        longer = longer[: max(0, max_size - len(SPECIALS) - len(char_tokens))]
    kept = set(longer)
    words = [w for w in words if len(w) == 1 or w in kept]
    kept.update(words)
    return list(SPECIALS) + words + [t for t in char_tokens if t not in kept]


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text):
    """Swap the words left and right (keeping case): the caption of a horizontally flipped image."""
    def swap(m):
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _LEFT_RIGHT.sub(swap, text)


# ----------------------------------------------------------------------------- images
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
_MEAN = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD).view(3, 1, 1)


def _to_rgb(img):
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: convert("RGB") would clip at 255, so scale 0..65535 down to 0..255 first
        arr = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 257.0)
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):  # composite on white, not on black
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def load_image(path, image_size, crop=None, flip=False):
    """Image file -> normalised FloatTensor (3, S, S). crop = (left, top, width, height) as fractions."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so corrupt or truncated files fail here
            img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"unreadable image {Path(path).resolve()}: {e}") from None
    w, h = img.size
    box = (0, 0, w, h) if crop is None else (
        crop[0] * w, crop[1] * h, (crop[0] + crop[2]) * w, (crop[1] + crop[3]) * h)
    img = img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return (x - _MEAN) / _STD


def denormalize(x):
    """Inverse of load_image's normalisation, back to [0, 1]; works on (3,S,S) and (B,3,S,S)."""
    return (x * _STD.to(x.device) + _MEAN.to(x.device)).clamp(0, 1)


# ----------------------------------------------------------------------------- the shapes world
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 240), "yellow": (240, 220, 50),
           "purple": (150, 60, 210), "orange": (250, 140, 30), "white": (245, 245, 245), "cyan": (40, 220, 230)}
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
_WORLD_VERSION = 1  # bump when the generator changes, so ensure_shapes_world rebuilds old worlds


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    size: str
    cx: float  # centre of the bounding box, pixels; y grows downwards
    cy: float

    def name(self, size=False):
        return f"{self.size} {self.colour} {self.shape}" if size else f"{self.colour} {self.shape}"


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(noun, n):
    return noun if n == 1 else noun + "s"


def _listing(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _half(size, s):  # half the side of the bounding box; large is clearly bigger than small
    return (0.09 if size == "small" else 0.16) * s


def _relations(a, b, margin):
    """Relations of a to b that are clear by more than margin pixels between centres."""
    rels = []
    rels += ["left of"] if a.cx < b.cx - margin else ["right of"] if a.cx > b.cx + margin else []
    rels += ["above"] if a.cy < b.cy - margin else ["below"] if a.cy > b.cy + margin else []
    return rels


def _scene(rng, s):
    """1-4 objects whose bounding boxes (plus a gap) do not overlap; kept off the border so that a
    0.8-scale random crop rarely cuts an object away."""
    pad, gap, want, objs = 0.06 * s, 0.05 * s, int(rng.integers(1, 5)), []
    for _ in range(100 * want):
        if len(objs) == want:
            break
        size = SIZES[rng.integers(2)]
        r = _half(size, s)
        cx, cy = (round(float(v), 1) for v in rng.uniform(pad + r, s - pad - r, size=2))
        if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= r + _half(o.size, s) + gap for o in objs):
            objs.append(_Obj(SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(8)], size, cx, cy))
    return objs


def _draw(objs, rng, s):
    base = rng.uniform(25, 95) + rng.uniform(-12, 12, size=3)  # dark-to-grey, slightly tinted
    ramp = np.linspace(-1, 1, s)[:, None, None] * rng.uniform(-15, 15)  # a vertical gradient
    noise = rng.normal(0, 10, size=(s, s, 3))
    img = Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in objs:
        r, fill = _half(o.size, s), COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([o.cx - r, o.cy - r, o.cx + r, o.cy + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([o.cx - r, o.cy - r, o.cx + r, o.cy + r], fill=fill)
        else:
            draw.polygon([(o.cx, o.cy - r), (o.cx + r, o.cy + r), (o.cx - r, o.cy + r)], fill=fill)
    return img


def _pick_round_robin(pools, rng, n):
    """n distinct items, taking turns over the pools (in random order) so that kinds vary."""
    pools = [sorted(set(p)) for p in pools if p]
    rng.shuffle(pools)
    out = []
    while len(out) < n and pools:
        for pool in list(pools):
            fresh = [x for x in pool if x not in out]
            if not fresh:
                pools.remove(pool)
            elif len(out) < n:
                out.append(rng.choice(fresh))
    return out


def _captions(objs, rng, n, margin):
    """n captions, each true of the scene: attributes, counts, relations, whole-scene listings."""
    k = len(objs)
    attrs = [c for o in objs for c in (_a(o.name(True)), f"there is {_a(o.name(True))}",
                                       f"{_a(o.name())} in the picture")]
    counts = [f"{NUMBERS[k]} {_plural('shape', k)}",
              f"there {'is' if k == 1 else 'are'} {NUMBERS[k]} {_plural('object', k)}"]
    for colour in {o.colour for o in objs}:
        m = sum(o.colour == colour for o in objs)
        counts.append(f"{NUMBERS[m]} {colour} {_plural('object', m)}")
    for shape in {o.shape for o in objs}:
        m = sum(o.shape == shape for o in objs)
        counts.append(f"{NUMBERS[m]} {_plural(shape, m)}")
    rels = [f"{_a(a.name())} {rel} {_a(b.name())}" for a, b in itertools.permutations(objs, 2)
            if a.name() != b.name() for rel in _relations(a, b, margin)]  # skip "a red x left of a red x"
    listing = _listing([_a(o.name(True)) for o in objs])
    scene = [listing, f"{NUMBERS[k]} {_plural('shape', k)}: {listing}", f"{listing} on a noisy background"]
    out = _pick_round_robin([attrs, counts, rels, scene], rng, n)
    return out + [out[i % len(out)] for i in range(n - len(out))]  # repeat if too few distinct


def _questions(objs, rng, n, margin, yes_no):
    """Up to n unambiguous (question, canonical answer) pairs; yes_no yields the answer of the next
    existence question, alternating so that yes and no are balanced over a split."""
    def unique(key, o):
        return sum(key(p) == key(o) for p in objs) == 1
    colour_q, shape_q, count_q, rel_q = [], [], [], []
    for o in objs:
        if unique(lambda p: (p.size, p.shape), o):
            colour_q.append((f"what color is the {o.size} {o.shape}?", o.colour))
        if unique(lambda p: p.shape, o):
            colour_q.append((f"what color is the {o.shape}?", o.colour))
        if unique(lambda p: p.colour, o):
            shape_q.append((f"what shape is the {o.colour} object?", o.shape))
        if unique(lambda p: (p.size, p.colour), o):
            shape_q.append((f"what shape is the {o.size} {o.colour} object?", o.shape))
    count_q.append(("how many shapes are there?", str(len(objs))))
    count_q += [(f"how many {s}s are there?", str(sum(o.shape == s for o in objs))) for s in SHAPES]
    count_q += [(f"how many {c} objects are there?", str(sum(o.colour == c for o in objs)))
                for c in {o.colour for o in objs}]
    for ref in (o for o in objs if unique(lambda p: (p.colour, p.shape), o)):
        others = [p for p in objs if p is not ref]
        for rel in ("left of", "right of", "above", "below"):
            offsets = [p.cx - ref.cx if rel in ("left of", "right of") else p.cy - ref.cy for p in others]
            # unambiguous only if every other object is clearly on one side or the other
            if others and all(abs(d) > margin for d in offsets):
                hits = [p for p in others if rel in _relations(p, ref, margin)]
                if len(hits) == 1:
                    rel_q.append((f"what shape is {rel} the {ref.name()}?", hits[0].shape))
                    rel_q.append((f"what color is the shape {rel} the {ref.name()}?", hits[0].colour))
    out = _pick_round_robin([colour_q, shape_q, count_q, rel_q], rng, max(0, n - 1))
    # one existence question per image, placed at a random position
    yes = next(yes_no)
    present = sorted({(o.colour, o.shape) for o in objs})
    absent = sorted(set(itertools.product(COLOURS, SHAPES)) - set(present))
    colour, shape = rng.choice(present if yes else absent)
    out.insert(rng.randrange(len(out) + 1), (f"is there {_a(colour + ' ' + shape)}?", "yes" if yes else "no"))
    return out[:n]


def _human_answers(answer, qid):
    """Ten 'human' answers in canonical form, as VQA v2's annotations store them (the official
    evaluation leaves agreeing ground truth untouched, so "Two" would never match "2"). A few
    annotators disagree on some questions (0-3 of 10, a plausible wrong answer), as real ones do."""
    if answer.isdigit():
        other = str(int(answer) + 1 if answer in "01" else int(answer) - 1)
    elif answer in ("yes", "no"):
        other = "no" if answer == "yes" else "yes"
    else:
        pool = SHAPES if answer in SHAPES else sorted(COLOURS)
        other = pool[(pool.index(answer) + 1) % len(pool)]
    dissent = qid % 4  # deterministic: the same data for the same seed
    return [other if k < dissent else answer for k in range(10)]


def _nlvr2_statement(rng):
    """A random statement about an image pair (L, R) and the predicate that decides it."""
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    side, k, m = rng.choice(("left", "right")), rng.randint(1, 4), rng.randint(1, 3)
    other = "right" if side == "left" else "left"
    pick = (lambda l, r: l) if side == "left" else (lambda l, r: r)
    has_colour = lambda objs: any(o.colour == colour for o in objs)  # noqa: E731
    statements = [
        (f"the {side} image has more shapes than the {other} image",
         lambda l, r: len(pick(l, r)) > len(pick(r, l))),
        ("both images have the same number of shapes", lambda l, r: len(l) == len(r)),
        (f"both images contain {_a(colour)} object", lambda l, r: has_colour(l) and has_colour(r)),
        (f"neither image contains {_a(colour)} object", lambda l, r: not has_colour(l + r)),
        (f"there {'is' if k == 1 else 'are'} exactly {NUMBERS[k]} {_plural(shape, k)} in total",
         lambda l, r: sum(o.shape == shape for o in l + r) == k),
        (f"there is {_a(shape)} in the {side} image", lambda l, r: any(o.shape == shape for o in pick(l, r))),
        (f"there is {_a(colour + ' ' + shape)} in the {side} image",
         lambda l, r: any((o.colour, o.shape) == (colour, shape) for o in pick(l, r))),
        (f"the {side} image contains exactly {NUMBERS[m]} {_plural('object', m)}",
         lambda l, r: len(pick(l, r)) == m),
    ]
    return statements[rng.randrange(len(statements))]


def _nlvr2_rows(split, scenes, names, n_rows, rng):
    """n_rows examples; each statement is used for 4 pairs labelled True, False, True, False, so that
    labels are balanced and NLVR2's consistency (all 4 right) can be measured."""
    rows, sentence_no = [], 0
    for _ in range(100 * n_rows + 100):  # statements that cannot get both labels here are redrawn
        if len(rows) >= n_rows:
            return rows
        sentence, truth = _nlvr2_statement(rng)
        group = []
        for want in [True, False, True, False][: n_rows - len(rows)]:
            for _ in range(300):
                i, j = rng.sample(range(len(scenes)), 2)
                if truth(scenes[i], scenes[j]) == want and (i, j) not in group:
                    group.append((i, j))
                    break
        if len(group) == min(4, n_rows - len(rows)):
            rows += [{"images": [names[i], names[j]], "sentence": sentence, "label": str(p % 2 == 0),
                      "identifier": f"{split}-{sentence_no}-{p}-0"} for p, (i, j) in enumerate(group)]
            sentence_no += 1
    raise ValueError(f"cannot make {n_rows} NLVR2 rows from {len(scenes)} {split} images")


def _write_json(path, rows):
    """A JSON list with one row per line: readable, greppable, and row i sits on line i + 2."""
    lines = ",\n".join(json.dumps(row, sort_keys=True) for row in rows)
    path.write_text("[\n" + lines + "\n]\n", encoding="utf-8")


_WORLD_FILES = ["pretrain", "retrieval_train", "retrieval_val", "retrieval_test", "vqa_train", "vqa_val",
                "vqa_test", "answer_list", "nlvr2_train", "nlvr2_val", "nlvr2_test", "scenes"]


def _world_paths(root):
    root = Path(root)
    paths = {"root": root, "images": root / "images", "vocab": root / "vocab.txt"}
    return paths | {name: root / f"{name}.json" for name in _WORLD_FILES}


def make_shapes_world(root, seed=0, image_size=64, n_train=4000, n_val=200, n_test=200,
                      captions_per_image=5, questions_per_image=3, nlvr2_per_split=(2000, 200, 200)):
    """Write the shapes world under root (same arguments => byte-identical files); returns the paths.
    Under DDP, let rank 0 call this (or ensure_shapes_world) while the others wait at a barrier."""
    params = dict(locals())  # the arguments, recorded in manifest.json
    paths = _world_paths(root)
    paths["images"].mkdir(parents=True, exist_ok=True)
    manifest = paths["root"] / "manifest.json"
    manifest.unlink(missing_ok=True)  # an interrupted run must not leave a valid-looking manifest
    margin = 0.1 * image_size  # relations need centres this far apart to be stated
    texts, answers, qid, meta = [], set(), 0, []
    for split_no, (split, n, n_nlvr2) in enumerate(zip(("train", "val", "test"), (n_train, n_val, n_test),
                                                       nlvr2_per_split)):
        rng = random.Random(f"{seed}-text-{split}")
        yes_no = itertools.cycle((True, False))
        scenes, names, captions, vqa = [], [], [], []
        for i in range(n):
            pixels = np.random.default_rng([seed, split_no, i])  # images do not depend on the text
            objs = _scene(pixels, image_size)
            names.append(f"images/{split}_{i:05d}.png")
            _draw(objs, pixels, image_size).save(paths["root"] / names[-1], format="PNG")
            scenes.append(objs)
            meta.append({"image": names[-1], "objects": [dict(vars(o)) for o in objs]})
            captions.append(_captions(objs, rng, captions_per_image, margin))
            for question, answer in _questions(objs, rng, questions_per_image, margin, yes_no):
                vqa.append({"question_id": qid, "question": question, "image": names[-1],
                            "answer": _human_answers(answer, qid), "dataset": "shapes"})
                answers.add(answer)
                qid += 1
        nlvr2 = _nlvr2_rows(split, scenes, names, n_nlvr2, rng)
        if split == "train":
            _write_json(paths["pretrain"], [{"image": m, "caption": c} for m, c in zip(names, captions)])
            _write_json(paths["retrieval_train"], [{"image": m, "caption": c, "image_id": i}
                                                   for i, (m, cs) in enumerate(zip(names, captions)) for c in cs])
        else:
            _write_json(paths[f"retrieval_{split}"], [{"image": m, "caption": c} for m, c in zip(names, captions)])
        _write_json(paths[f"vqa_{split}"], vqa)
        _write_json(paths[f"nlvr2_{split}"], nlvr2)
        texts += [c for cs in captions for c in cs] + [r["sentence"] for r in nlvr2]
        texts += [r["question"] for r in vqa] + [a for r in vqa for a in r["answer"]]
    _write_json(paths["answer_list"], sorted(answers))
    _write_json(paths["scenes"], meta)  # ground truth per image, for tests and debugging
    WordPieceTokenizer(build_vocab(texts)).save(paths["vocab"])
    manifest.write_text(json.dumps(_world_params(params), indent=1, sort_keys=True))  # last: world complete
    return paths


def _world_params(arguments):
    params = {k: v for k, v in arguments.items() if k != "root"}
    return params | {"nlvr2_per_split": list(params["nlvr2_per_split"]), "version": _WORLD_VERSION}


def ensure_shapes_world(root, **kwargs):
    """make_shapes_world, unless root/manifest.json shows it was already made with these arguments."""
    bound = inspect.signature(make_shapes_world).bind(root, **kwargs)
    bound.apply_defaults()
    manifest = Path(root) / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == _world_params(bound.arguments):
        return _world_paths(root)
    return make_shapes_world(root, **kwargs)


# ----------------------------------------------------------------------------- readers of the real formats
def _type_names(types):
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def _row_problem(row, required, optional):
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    for key in required:
        if key not in row:
            return f"missing key '{key}'"
    for key, types in (required | {k: t for k, t in optional.items() if k in row}).items():
        value = row[key]
        if not isinstance(value, types) or isinstance(value, bool):  # bool would pass as int
            return f"'{key}' should be {_type_names(types)}, got {type(value).__name__}"
        if isinstance(value, str) and not value.strip():
            return f"empty '{key}'"
        if isinstance(value, list) and not (value and all(isinstance(v, str) and v.strip() for v in value)):
            return f"'{key}' must be a non-empty list of non-empty strings"
    return None


def read_json_rows(path, required, skip_bad=False, optional=None, check=None):
    """Read a JSON list of row objects and validate their keys and types (required always, optional
    when present; check(row) returns a further problem or None). Returns (rows, skipped): skipped
    counts the problems of the rows left out with skip_bad; without it the first problem raises
    DataError, so rows[i] is row i of the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: file not found: {path.resolve()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path.name}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of rows, got a {type(data).__name__}")
    rows, skipped = [], Counter()
    for i, row in enumerate(data):
        problem = _row_problem(row, required, optional or {})
        problem = problem or (check(row) if check else None)
        if problem is None:
            rows.append(row)
        elif skip_bad:
            skipped[problem] += 1
        else:
            raise DataError(f"{path.name} row {i}: {problem}")
    return rows, skipped


class Skip(str):
    """What a dataset returns instead of an item whose image failed to load under skip_bad: the
    reason travels with the batch (also out of worker processes) and the training loop counts it."""


class _JsonImageDataset(Dataset):
    """Shared by all readers: the validated rows, the image root and image loading with row errors."""
    required, optional = {}, {}

    def __init__(self, json_path, image_root, image_size, skip_bad=False):
        self.json_name, self.image_root = Path(json_path).name, Path(image_root)
        self.image_size, self.skip_bad = image_size, skip_bad
        if not self.image_root.is_dir():
            raise DataError(f"{self.json_name}: image root does not exist: {self.image_root.resolve()}")
        self.rows, self.skipped = read_json_rows(json_path, self.required, skip_bad, self.optional, self.check)

    def check(self, row):  # format-specific checks beyond keys and types
        return None

    def __len__(self):
        return len(self.rows)

    def _image(self, index, relative, crop=None, flip=False):
        """The image as a tensor, or a Skip when skip_bad and it is missing or unreadable. (Without
        skip_bad, index is the row number in the file.)"""
        path = self.image_root / relative
        try:
            if not path.is_file():
                raise DataError(f"image not found: {path.resolve()}")
            return load_image(path, self.image_size, crop, flip)
        except DataError as e:
            if not self.skip_bad:
                raise DataError(f"{self.json_name} row {index}: {e}") from None
            return Skip("image not found" if not path.is_file() else "unreadable image")


def _captions_of(row):
    return row["caption"] if isinstance(row["caption"], list) else [row["caption"]]


class PretrainDataset(_JsonImageDataset):
    """{"image", "caption": str or [str]} -> {"image", "text", "index"}. The caption choice and the
    augmentation depend only on (seed, epoch, index): reproducible and resumable with any workers."""
    required = {"image": str, "caption": (str, list)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False, augment=False, seed=0):
        super().__init__(json_path, image_root, image_size, skip_bad)
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        row = self.rows[index]
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        captions = _captions_of(row)
        text, crop, flip = captions[rng.randrange(len(captions))], None, False
        if self.augment:  # mild random-resized-crop (area 0.8-1, aspect 3/4-4/3) and a flip
            area, aspect = rng.uniform(0.8, 1.0), math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
            crop = (rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h)
            flip = rng.random() < 0.5
            text = swap_left_right(text) if flip else text  # "left of" must stay true after the flip
        image = self._image(index, row["image"], crop, flip)
        return image if isinstance(image, Skip) else {"image": image, "text": text, "index": index}


class RetrievalTrainDataset(_JsonImageDataset):
    """{"image", "caption": str, "image_id"} -> {"image", "text", "image_id"}. Like ALBEF, image ids
    (int or str in the real files) are renumbered 0.. in order of first appearance."""
    required = {"image": str, "caption": str, "image_id": (int, str)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False):
        super().__init__(json_path, image_root, image_size, skip_bad)
        self.image_ids = {}
        for row in self.rows:
            self.image_ids.setdefault(row["image_id"], len(self.image_ids))

    def __getitem__(self, index):
        row = self.rows[index]
        image = self._image(index, row["image"])
        return image if isinstance(image, Skip) else {
            "image": image, "text": row["caption"], "image_id": self.image_ids[row["image_id"]]}


class RetrievalEvalDataset(_JsonImageDataset):
    """{"image", "caption": [str, ...]} -> images only; the texts and the index maps are attributes."""
    required = {"image": str, "caption": (str, list)}

    def __init__(self, json_path, image_root, image_size, skip_bad=False):
        super().__init__(json_path, image_root, image_size, skip_bad)
        self.texts, self.img2txt, self.txt2img = [], [], []
        for image_index, row in enumerate(self.rows):
            captions = _captions_of(row)
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.txt2img += [image_index] * len(captions)
            self.texts += captions

    def __getitem__(self, index):
        row = self.rows[index]
        image = self._image(index, row["image"])
        return image if isinstance(image, Skip) else {"image": image, "index": index}


class VQADataset(_JsonImageDataset):
    """{"question_id", "question", "image", "answer": [str] or str} -> {"image", "text",
    "question_id", "answers"}. "answer" may be absent (the VQA test split has none): answers = []."""
    required = {"question_id": int, "question": str, "image": str}
    optional = {"answer": (str, list)}

    def __init__(self, json_path, image_root, image_size, answer_list_path=None, skip_bad=False):
        super().__init__(json_path, image_root, image_size, skip_bad)
        self.answer_list = None
        if answer_list_path is not None:
            path = Path(answer_list_path)
            if not path.is_file():
                raise DataError(f"{path.name}: file not found: {path.resolve()}")
            self.answer_list = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(self.answer_list, list) or not all(isinstance(a, str) for a in self.answer_list):
                raise DataError(f"{path.name}: expected a JSON list of answer strings")

    def __getitem__(self, index):
        row = self.rows[index]
        answers = row.get("answer", [])
        image = self._image(index, row["image"])
        return image if isinstance(image, Skip) else {
            "image": image, "text": row["question"], "question_id": row["question_id"],
            "answers": [answers] if isinstance(answers, str) else list(answers)}


class NLVR2Dataset(_JsonImageDataset):
    """{"images": [left, right], "sentence", "label": "True"/"False"} -> {"image0", "image1", "text",
    "label": 1/0, "identifier"}."""
    required = {"images": list, "sentence": str, "label": str}
    optional = {"identifier": str}

    def check(self, row):
        if len(row["images"]) != 2:
            return f"'images' must hold exactly 2 images, got {len(row['images'])}"
        if row["label"] not in ("True", "False"):
            return f"'label' must be \"True\" or \"False\", got {row['label']!r}"
        return None

    def __getitem__(self, index):
        row = self.rows[index]
        images = [self._image(index, p) for p in row["images"]]
        skips = [x for x in images if isinstance(x, Skip)]
        return skips[0] if skips else {
            "image0": images[0], "image1": images[1], "text": row["sentence"],
            "label": int(row["label"] == "True"), "identifier": row.get("identifier", "")}


# ----------------------------------------------------------------------------- batches and loaders
class Collator:
    """Items -> batch: stacks tensors, tokenizes and pads "text" into text_ids (B, T) and text_mask
    (B, T; True on [CLS]..[SEP]), ints -> LongTensor, the rest lists. Skipped items are left out and
    counted by reason in batch["skipped"]; a batch of skips only holds just that."""

    def __init__(self, tokenizer, max_len):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        kept = [item for item in items if not isinstance(item, Skip)]
        batch = {"skipped": Counter(item for item in items if isinstance(item, Skip))}
        if not kept:
            return batch
        for key in kept[0]:
            values = [item[key] for item in kept]
            if key == "text":
                ids = [self.tokenizer.encode(t, self.max_len) for t in values]
                lengths = torch.tensor([len(x) for x in ids])
                batch["text_ids"] = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id)
                for b, x in enumerate(ids):
                    batch["text_ids"][b, : len(x)] = torch.tensor(x)
                batch["text_mask"] = torch.arange(batch["text_ids"].shape[1]) < lengths[:, None]
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            elif isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
            else:
                batch[key] = values
        return batch


def make_loader(dataset, batch_size, collator, shuffle, seed=0, num_workers=0, drop_last=False,
                distributed=False):
    """The one loader recipe of the training scripts; call loader_set_epoch(loader, e) each epoch."""
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    sampler.base_seed = seed  # loader_set_epoch reseeds from it
    # workers are not persistent, so each epoch's workers copy the dataset after set_epoch; the
    # loader's own generator keeps it from drawing worker seeds from the global torch RNG
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=num_workers, drop_last=drop_last, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed))


def loader_set_epoch(loader, epoch):
    """Make the data of `epoch` a pure function of (seed, epoch), so a resumed run sees the same."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(sampler.base_seed + epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
