"""The concept probe: its items are true of their scenes with one answer, its scores count right answers, and a
model that never saw an image scores with the image as it does without."""
import json
import re

import torch

import masking
import probe
import shapes
from heads import EVEWithHeads
from model import make_config
from tokenization import WordPieceTokenizer

ARTICLE = re.compile(r"^an? ")


def phrases(listing):
    """'a small red circle, a large blue square and ...' -> the object phrases without articles."""
    return sorted(ARTICLE.sub("", p) for p in re.split(r", | and ", listing))


def true_of(scene, item, word):
    """Whether the item's caption with `word` in the blank is true of the scene, judged from the scene's objects
    directly (not through the probe's own rules)."""
    objs, text = scene["objects"], item.before + word + item.after
    if item.kind == "count":
        return word == shapes.NUMBERS[len(objs)]
    if item.kind == "relation":
        a, b = _relation_names(text, len(objs))
        pa, pb = (next(o for o in objs if f"{o['colour']} {o['shape']}" == n) for n in (a, b))
        margin = 0.1 * 64
        holds = {"left": pa["cx"] < pb["cx"] - margin, "right": pa["cx"] > pb["cx"] + margin,
                 "above": pa["cy"] < pb["cy"] - margin, "below": pa["cy"] > pb["cy"] + margin}
        return holds[word]
    listing = text.split(" at the ")[0]
    return phrases(listing) == sorted(f"{o['size']} {o['colour']} {o['shape']}" for o in objs)


def _relation_names(text, k):
    """The two colour-shape names a relation caption relates."""
    if k == 2:
        m = re.fullmatch(r"an? \w+ (\w+ \w+) \w+(?: of)? an? \w+ (\w+ \w+)", text)
    else:
        m = re.fullmatch(r".*; the (\w+ \w+) is \w+(?: of)? the (\w+ \w+)", text)
    return m.groups()


def test_every_item_has_exactly_one_true_answer(small_world):
    scenes = {s["image"]: s for s in json.loads(small_world["scenes"].read_text())}
    items = probe.probe_items(small_world["root"], "test") + probe.probe_items(small_world["root"], "val")
    assert {it.kind for it in items} == set(probe.KINDS)
    for it in items:
        true_words = [w for w in it.candidates if true_of(scenes[it.image], it, w)]
        assert true_words == [it.answer], (it, true_words)
    assert probe.probe_items(small_world["root"], "test") == probe.probe_items(small_world["root"], "test")
    subset = probe.probe_items(small_world["root"], "test", per_kind=2)
    assert all(sum(it.kind == k for it in subset) <= 2 for k in probe.KINDS)


class Oracle(torch.nn.Module):
    """Stands in for EVE: with the image it puts the largest logit on `with_image(item)`'s word, without it on
    `text_only(item)`'s; hidden states are one-hot over the vocabulary and mlm_logits is the identity."""

    def __init__(self, p, tokenizer, with_image, text_only):
        super().__init__()
        self.vocab, self.mask_id = len(tokenizer), tokenizer.mask_id
        ids = tokenizer.token_to_id
        # by image and caption: the count items of scenes with 2-4 objects share one caption ("[MASK] shapes")
        self.answer = {(p.images[i].numpy().tobytes(), tuple(x)): ids[with_image(it)]
                       for it, x, i in zip(p.items, p.ids, p.image_of)}
        self.guess = {tuple(x): ids[text_only(it)] for it, x in zip(p.items, p.ids)}

    def encode(self, images, text, valid):
        n_image = 0 if images is None else 5
        hidden = torch.zeros(*text.shape[:1], n_image + text.shape[1], self.vocab)
        for b, row in enumerate(text):
            key = tuple(int(t) for t, v in zip(row, valid[b]) if v)
            word = self.guess[key] if images is None else self.answer[images[b].numpy().tobytes(), key]
            hidden[b, n_image + key.index(self.mask_id), word] = 1.0
        return {"hidden": hidden, "n_image": n_image}

    def mlm_logits(self, hidden):
        return hidden


def test_scores_count_the_right_answers(small_world):
    tokenizer = WordPieceTokenizer.from_file(small_world["vocab"])
    p = probe.Probe(small_world["root"], tokenizer, 64, "test")
    first = lambda it: it.candidates[0]  # noqa: E731
    model = Oracle(p, tokenizer, with_image=lambda it: it.answer, text_only=first)
    scores = p.scores(model, torch.device("cpu"))
    for kind in probe.KINDS:
        mine = [it for it in p.items if it.kind == kind]
        assert scores[f"probe_{kind}"] == 100.0
        expected = 100 * sum(it.answer == it.candidates[0] for it in mine) / len(mine)  # by hand, from the items
        assert abs(scores[f"probe_{kind}_text"] - expected) < 0.01
    wrong = Oracle(p, tokenizer, with_image=lambda it: next(w for w in it.candidates if w != it.answer),
                   text_only=first)
    assert all(p.scores(wrong, torch.device("cpu"))[f"probe_{k}"] == 0.0 for k in probe.KINDS)


def test_a_model_trained_on_captions_alone_scores_at_the_text_only_level(tmp_path):
    """Trained by MLM on the captions without their images, the model has nothing to read from an image: with the
    image it must score what it scores without (within the noise of about 100 items a kind)."""
    world = shapes.make_shapes_world(tmp_path, n_train=64, n_val=4, n_test=100, nlvr2_per_split=(8, 4, 4))
    tokenizer = WordPieceTokenizer.from_file(world["vocab"])
    captions = [c for row in json.loads(world["pretrain"].read_text()) for c in row["caption"]]
    torch.manual_seed(0)
    model = EVEWithHeads(make_config("micro", vocab_size=len(tokenizer)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(150):
        batch = [tokenizer.encode(c) for c in captions[step * 16 % len(captions):][:16]]
        text = torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in batch], batch_first=True)
        ids, labels = masking.mask_text(text, tokenizer.special_ids, tokenizer.mask_id, len(tokenizer), 0.3)
        hidden = model.encode(None, ids, text != tokenizer.pad_id)["hidden"]
        loss, _ = model.mlm_loss(hidden, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = probe.Probe(world["root"], tokenizer, model.cfg.image_size).scores(model, torch.device("cpu"))
    assert scores["probe_colour_text"] < 30  # the captions alone do not tell a colour (chance 12.5)
    for kind in probe.KINDS:
        assert abs(scores[f"probe_{kind}"] - scores[f"probe_{kind}_text"]) <= 10, (kind, scores)


def test_pretraining_logs_the_probe(small_world, tmp_path):
    """pretrain.py writes the probe's scores every --probe-every steps and at the last, both kinds of score, as
    probe.py computes them for the same weights."""
    import pretrain
    from conftest import TINY_MODEL_FLAGS
    model = pretrain.main(["--data-dir", str(small_world["root"]), *TINY_MODEL_FLAGS, "--out-dir", str(tmp_path),
                           "--batch-size", "8", "--num-workers", "0", "--max-steps", "3", "--probe-every", "2"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "probe_shape" in r]
    assert [r["step"] for r in logged] == [2, 3]
    tokenizer = WordPieceTokenizer.from_file(small_world["vocab"])
    again = probe.Probe(small_world["root"], tokenizer, model.cfg.image_size,
                        per_kind=pretrain.PROBE_ITEMS).scores(model, torch.device("cpu"))
    assert {k: logged[-1][k] for k in again} == again
