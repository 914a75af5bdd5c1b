"""The shapes world: a synthetic image-text world in the real data formats, made with no download.

Seeded scenes of 1-4 coloured shapes on a noisy background, with captions, VQA questions and NLVR2
statements that are true by construction, written as PNG images and the ALBEF/X-VLM JSON files that
pretrain.py and finetune.py read (pre-training, retrieval, VQA with its answer list, NLVR2), plus a
vocab.txt built from its texts. `ensure_shapes_world(root)` writes it once; `shapes_world(root,
rank, world)`, what the training scripts call, keeps a world already made in root (with any sizes, e.g. more
NLVR2 training rows: `make_shapes_world(root, nlvr2_per_split=(8000, 200, 200))`) and writes the default one
where there is none, under DDP too (rank 0 writes, the others wait).
"""
import inspect
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tokenization import WordPieceTokenizer, build_vocab

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 240), "yellow": (240, 220, 50),
           "purple": (150, 60, 210), "orange": (250, 140, 30), "white": (245, 245, 245), "cyan": (40, 220, 230)}
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
# VQA v2's answer_type of each kind of question (question_type here is the kind itself)
ANSWER_TYPES = {"colour": "other", "shape": "other", "relation": "other", "count": "number", "existence": "yes/no"}
_WORLD_VERSION = 2  # bump when the generator changes, so ensure_shapes_world rebuilds old worlds


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


def _region(o, s):
    """Where an object's centre lies on a 3 x 3 grid of the image: "top left" ... "bottom right"."""
    row = ("top", "middle", "bottom")[min(2, int(3 * o.cy / s))]
    col = ("left", "centre", "right")[min(2, int(3 * o.cx / s))]
    return f"{row} {col}"


def _identity(objs, s):
    """What every caption of a scene states: its objects (size, colour, shape) and a lone object's region.
    The scenes of a val or test split have distinct identities, so that each caption names one image."""
    return tuple(sorted(o.name(True) for o in objs)) + ((_region(objs[0], s),) if len(objs) == 1 else ())


def _captions(objs, rng, n, margin, s):
    """n distinct captions, each true of the scene and naming every object in it (a lone object with its
    region), so that a caption identifies its image; the kinds add a count, a relation or the background."""
    k = len(objs)

    def listing():  # the objects in a random order
        order = rng.sample(objs, k)
        return _listing([_a(o.name(True)) for o in order]) + (f" at the {_region(objs[0], s)}" if k == 1 else "")

    named = [o for o in objs if sum(p.name() == o.name() for p in objs) == 1]  # "the red circle" is unambiguous
    rels = [(a, rel, b) for a, b in itertools.permutations(named, 2) for rel in _relations(a, b, margin)]

    def relation():
        a, rel, b = rng.choice(rels)
        if k == 2:
            return f"{_a(a.name(True))} {rel} {_a(b.name(True))}"
        return f"{listing()}; the {a.name()} is {rel} the {b.name()}"

    kinds = [listing, lambda: f"{NUMBERS[k]} {_plural('shape', k)}: {listing()}",
             lambda: f"{listing()} on a noisy background",
             lambda: f"there {'is' if k == 1 else 'are'} {NUMBERS[k]} {_plural('object', k)}: {listing()}"]
    kinds += [relation] if rels else []
    out = []
    for attempt in range(20 * n):  # each kind in turn; a one-object scene has few distinct captions
        caption = kinds[attempt % len(kinds)]()
        if caption not in out:
            out.append(caption)
        if len(out) == n:
            break
    return out + [out[i % len(out)] for i in range(n - len(out))]  # repeat if too few distinct


def _questions(objs, rng, n, margin, yes_no):
    """Up to n unambiguous (question, canonical answer, question type) triples; yes_no yields the answer of the next
    existence question, alternating so that yes and no are balanced over a split."""
    def unique(key, o):
        return sum(key(p) == key(o) for p in objs) == 1
    colour_q, shape_q, count_q, rel_q = [], [], [], []
    for o in objs:
        if unique(lambda p: (p.size, p.shape), o):
            colour_q.append((f"what color is the {o.size} {o.shape}?", o.colour, "colour"))
        if unique(lambda p: p.shape, o):
            colour_q.append((f"what color is the {o.shape}?", o.colour, "colour"))
        if unique(lambda p: p.colour, o):
            shape_q.append((f"what shape is the {o.colour} object?", o.shape, "shape"))
        if unique(lambda p: (p.size, p.colour), o):
            shape_q.append((f"what shape is the {o.size} {o.colour} object?", o.shape, "shape"))
    count_q.append(("how many shapes are there?", str(len(objs)), "count"))
    count_q += [(f"how many {s}s are there?", str(sum(o.shape == s for o in objs)), "count") for s in SHAPES]
    count_q += [(f"how many {c} objects are there?", str(sum(o.colour == c for o in objs)), "count")
                for c in {o.colour for o in objs}]
    for ref in (o for o in objs if unique(lambda p: (p.colour, p.shape), o)):
        others = [p for p in objs if p is not ref]
        for rel in ("left of", "right of", "above", "below"):
            offsets = [p.cx - ref.cx if rel in ("left of", "right of") else p.cy - ref.cy for p in others]
            # unambiguous only if every other object is clearly on one side or the other
            if others and all(abs(d) > margin for d in offsets):
                hits = [p for p in others if rel in _relations(p, ref, margin)]
                if len(hits) == 1:
                    rel_q.append((f"what shape is {rel} the {ref.name()}?", hits[0].shape, "relation"))
                    rel_q.append((f"what color is the shape {rel} the {ref.name()}?", hits[0].colour, "relation"))
    out = _pick_round_robin([colour_q, shape_q, count_q, rel_q], rng, max(0, n - 1))
    # one existence question per image, placed at a random position
    yes = next(yes_no)
    present = sorted({(o.colour, o.shape) for o in objs})
    absent = sorted(set(itertools.product(COLOURS, SHAPES)) - set(present))
    colour, shape = rng.choice(present if yes else absent)
    out.insert(rng.randrange(len(out) + 1), (f"is there {_a(colour + ' ' + shape)}?", "yes" if yes else "no", "existence"))
    return out[:n]


def _annotator_answers(answer, qid):
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
        scenes, names, captions, vqa, seen = [], [], [], [], set()
        for i in range(n):
            pixels = np.random.default_rng([seed, split_no, i])  # images do not depend on the text
            objs = _scene(pixels, image_size)
            while split != "train" and _identity(objs, image_size) in seen:  # captions must name one image
                objs = _scene(pixels, image_size)
            seen.add(_identity(objs, image_size))
            names.append(f"images/{split}_{i:05d}.png")
            _draw(objs, pixels, image_size).save(paths["root"] / names[-1], format="PNG")
            scenes.append(objs)
            meta.append({"image": names[-1], "objects": [dict(vars(o)) for o in objs]})
            captions.append(_captions(objs, rng, captions_per_image, margin, image_size))
            for question, answer, kind in _questions(objs, rng, questions_per_image, margin, yes_no):
                vqa.append({"question_id": qid, "question": question, "image": names[-1],
                            "answer": _annotator_answers(answer, qid), "dataset": "shapes",
                            "question_type": kind, "answer_type": ANSWER_TYPES[kind]})
                answers.update(vqa[-1]["answer"])  # every annotator answer is in the answer list
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


def made_world(root):
    """Whether root holds a finished shapes world of the current generator version, whatever its sizes or
    seed (manifest.json is written last, so an interrupted run leaves none)."""
    try:
        return json.loads((Path(root) / "manifest.json").read_text()).get("version") == _WORLD_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def shapes_world(folder, rank, world):
    """The shapes world's files for the training scripts' --data-dir: a world already made there (by
    make_shapes_world, with any sizes or seed) is used as it is; an absent, unfinished or older one is written
    with the defaults, by rank 0 while the other ranks wait."""
    if rank == 0 and not made_world(folder):
        make_shapes_world(folder)
    if world > 1:
        torch.distributed.barrier()
    return _world_paths(folder)
