"""The concept probe: which words of a caption a pre-trained model fills in from the image.

For each held-out (test) scene of the shapes world, one word of a kind is replaced by [MASK] in a caption written
as the pre-training captions are, and the MLM head picks among the words of that kind (the largest logit wins).
Every item is scored twice, with the image and with the text alone: what is learned from the image is the
difference. A word is asked only where the rest of the caption makes its answer unique.

    kind      candidates                     the caption, masked
    shape     circle, square, triangle       a large red circle and a small blue [MASK]
    colour    the 8 colours                  a large red circle and a small [MASK] triangle
    size      small, large                   a large red circle and a [MASK] blue triangle
    count     one .. four                    [MASK] shapes  (without the list of objects, which gives it away)
    relation  left, right / above, below     a large red circle [MASK] of a small blue triangle

Commands:
    python probe.py runs/pretrain/last.pt                 # the table: with the image, text only, chance
    python probe.py runs/pretrain/last.pt --json probe.json
pretrain.py logs the same scores on a fixed subset (`--probe-every`) as probe_<kind> and probe_<kind>_text in
metrics.jsonl; `python pictures.py concepts runs/pretrain/metrics.jsonl` draws them against the step.
"""
import argparse
import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import evaluate
import predictions
import shapes

KINDS = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "size": shapes.SIZES,
         "count": shapes.NUMBERS[1:5], "relation": ("left", "right", "above", "below")}
RELATION_PAIRS = {"left": ("left", "right"), "right": ("left", "right"), "above": ("above", "below"),
                  "below": ("above", "below")}  # "[MASK] of" tells left/right from above/below: ask within a pair


@dataclass(frozen=True)
class Item:
    image: str  # path relative to the world's root
    kind: str
    before: str  # the caption's words before the masked one
    after: str  # and after it
    answer: str
    candidates: tuple

    @property
    def chance(self):
        return 1 / len(self.candidates)


def _object_items(image, objs, rng, size):
    """shape, colour and size items: the scene's objects listed in a random order, one word of one object masked,
    where the object's other two words name it alone among the scene's objects."""
    attrs = ("size", "colour", "shape")  # the order of a caption's object phrase: "a small blue circle"
    items = []
    for kind in ("shape", "colour", "size"):
        others = [a for a in attrs if a != kind]
        for o in objs:
            if sum(all(getattr(p, a) == getattr(o, a) for a in others) for p in objs) != 1:
                continue  # another object shares the unmasked words: the answer would not be unique
            order = rng.sample(objs, len(objs))
            phrases = [shapes._a(p.name(True)) for p in order]
            words = [getattr(o, a) if a != kind else "\0" for a in attrs]
            phrases[order.index(o)] = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
            listing = shapes._listing(phrases) + (f" at the {shapes._region(o, size)}" if len(objs) == 1 else "")
            before, after = listing.split("\0")
            items.append(Item(image, kind, before, after, getattr(o, kind), KINDS[kind]))
    return items


def _scene_items(image, objs, rng, size):
    """All items of one scene: its objects' words, its count, and one relation between two named objects."""
    items, margin = _object_items(image, objs, rng, size), 0.1 * size  # the margin the world's relations use
    k = len(objs)
    items.append(Item(image, "count", "", " " + shapes._plural("shape", k), shapes.NUMBERS[k], KINDS["count"]))
    named = [o for o in objs if sum(p.name() == o.name() for p in objs) == 1]
    rels = [(a, r, b) for a in named for b in named if a is not b for r in shapes._relations(a, b, margin)]
    if rels:
        a, rel, b = rng.choice(rels)
        word = rel.split()[0]  # "left of" -> "left"
        rest = rel[len(word):]  # " of" or ""
        if k == 2:
            before, after = shapes._a(a.name(True)) + " ", f"{rest} {shapes._a(b.name(True))}"
        else:
            listing = shapes._listing([shapes._a(p.name(True)) for p in rng.sample(objs, k)])
            before, after = f"{listing}; the {a.name()} is ", f"{rest} the {b.name()}"
        items.append(Item(image, "relation", before, after, word, RELATION_PAIRS[word]))
    return items


def probe_items(root, split="test", per_kind=0):
    """The probe's items over the scenes of `split` (deterministic); per_kind > 0 keeps the first per_kind of each
    kind (the subset pre-training logs)."""
    root = Path(root)
    size = json.loads((root / "manifest.json").read_text())["image_size"]  # of the world's scenes, in pixels
    items = []
    for scene in json.loads((root / "scenes.json").read_text()):
        if Path(scene["image"]).name.startswith(split + "_"):
            objs = [shapes._Obj(**o) for o in scene["objects"]]
            items += _scene_items(scene["image"], objs, random.Random(f"probe-{scene['image']}"), size)
    if per_kind:
        by_kind = defaultdict(list)
        for it in items:
            by_kind[it.kind].append(it)
        items = [it for kind in KINDS for it in by_kind[kind][:per_kind]]
    return items


class Probe:
    """The items made ready once (images loaded, captions tokenized) and scored as often as wanted."""

    def __init__(self, root, tokenizer, image_size, split="test", per_kind=0):
        self.items = probe_items(root, split, per_kind)
        paths = sorted({it.image for it in self.items})
        index = {p: i for i, p in enumerate(paths)}
        self.images = torch.stack([data.load_image(Path(root) / p, image_size) for p in paths])  # (n_images, 3, S, S)
        self.image_of = torch.tensor([index[it.image] for it in self.items])
        for word in {w for it in self.items for w in it.candidates}:
            if len(tokenizer.text_ids(word)) != 1:
                raise ValueError(f"the probe's word {word!r} is not one token in this vocabulary")
        self.ids = [[tokenizer.cls_id] + tokenizer.text_ids(it.before) + [tokenizer.mask_id]
                    + tokenizer.text_ids(it.after) + [tokenizer.sep_id] for it in self.items]
        self.candidates = [[tokenizer.text_ids(w)[0] for w in it.candidates] for it in self.items]
        self.answers = [it.candidates.index(it.answer) for it in self.items]
        self.pad_id, self.mask_id = tokenizer.pad_id, tokenizer.mask_id

    @torch.no_grad()
    def predictions(self, model, with_image, device, batch_size=128):
        """The index of the chosen candidate of every item."""
        was_training = model.training
        model.eval()
        chosen = []
        for start in range(0, len(self.items), batch_size):
            text, text_mask = (t.to(device) for t in data.pad_ids(self.ids[start:start + batch_size], self.pad_id))
            images = self.images[self.image_of[start:start + batch_size]].to(device) if with_image else None
            enc = model.encode(images, text, text_mask)
            hidden = enc["hidden"][:, enc["n_image"]:][text == self.mask_id]  # (B, D): one [MASK] per caption
            logits = model.mlm_logits(hidden).float().cpu()  # (B, vocab)
            for row, cands in zip(logits, self.candidates[start:start + batch_size]):
                chosen.append(int(row[cands].argmax()))
        model.train(was_training)
        return chosen

    def scores(self, model, device):
        """{'probe_<kind>': accuracy with the image, 'probe_<kind>_text': text only, in percent}."""
        out = {}
        for with_image, suffix in ((True, ""), (False, "_text")):
            right, total = defaultdict(int), defaultdict(int)
            for it, guess, answer in zip(self.items, self.predictions(model, with_image, device), self.answers):
                right[it.kind] += guess == answer
                total[it.kind] += 1
            out |= {f"probe_{k}{suffix}": round(100 * right[k] / total[k], 2) for k in KINDS if total[k]}
        return out

    def chance(self):
        """Each kind's chance level in percent (the mean over its items of 1 / candidates)."""
        by_kind = defaultdict(list)
        for it in self.items:
            by_kind[it.kind].append(it.chance)
        return {k: round(100 * sum(v) / len(v), 2) for k, v in by_kind.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a pretrain.py checkpoint (last.pt)")
    parser.add_argument("--data-dir", default="data/shapes", help="the shapes world the model was trained on")
    parser.add_argument("--split", default="test", help="the scenes asked about: test | val")
    parser.add_argument("--json", default="", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    if not shapes.made_world(args.data_dir):
        raise SystemExit(f"error: {args.data_dir} holds no shapes world (pretrain.py makes one)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = evaluate.load_pretrained(args.checkpoint, device)
    probe = Probe(args.data_dir, tokenizer, model.cfg.image_size, args.split)
    scores, chance = probe.scores(model, device), probe.chance()
    counts = defaultdict(int)
    for it in probe.items:
        counts[it.kind] += 1
    print(f"{'kind':9s} {'items':>5s} {'image':>7s} {'text':>7s} {'chance':>7s}")
    for k in KINDS:
        if counts[k]:
            print(f"{k:9s} {counts[k]:5d} {scores[f'probe_{k}']:7.1f} {scores[f'probe_{k}_text']:7.1f} {chance[k]:7.1f}")
    if args.json:
        predictions.write_json(args.json, {"checkpoint": str(args.checkpoint), "split": args.split, **scores,
                                           "chance": chance, "items": dict(counts)})  # whole, then renamed
    return scores


if __name__ == "__main__":
    main()
