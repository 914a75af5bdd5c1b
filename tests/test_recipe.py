"""The official fine-tuning recipe (issue 11 part 2): optimizer and schedule values, fine-tuning augmentation,
another resolution than pre-training (position tables resized) and the NLVR2 bi-attention head."""
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import augment
import data
import finetune
import official
import pretrain
import checkpoints
import training
from conftest import TINY_MODEL_FLAGS
from heads import CrossAttention, EVEWithHeads, NLVR2BiAttention
from model import EVEConfig, make_config
from test_official import official_state_dict


def tiny_cfg(**kw):
    return make_config("tiny", vocab_size=50, dim=32, depth=2, heads=2, num_experts=4, top_layers=1, image_size=32,
                       decoder_dim=32, decoder_depth=1, decoder_heads=2, itc_dim=32, **kw)


# ---- optimizer and schedule ------------------------------------------------------------------------------------

def test_linear_schedule_and_beta2_reach_the_optimizer():
    model = EVEWithHeads(tiny_cfg(), num_answers=3)
    tc = training.TrainingConfig(lr=1e-3, warmup_steps=2, max_steps=10, min_lr_ratio=0.0, schedule="linear",
                                 adam_beta2=0.98)
    opt, sched = training.make_optimizer(model, tc)
    assert all(g["betas"] == (0.9, 0.98) for g in opt.param_groups)
    # by hand: (s + 1) / 2 during the warm-up, then a straight line from 1 at step 2 to 0 at step 10
    want = [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    for s, w in enumerate(want):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * w), s
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="cosine or linear"):
        training.warmup_cosine(1, 10, schedule="step")


def test_official_recipe_fills_what_was_not_given():
    base, default = make_config("base"), finetune.FinetuneConfig(task="nlvr2")
    out, model = finetune.settle({"task": "nlvr2", "lr": 1e-4}, base)  # auto: base is the official architecture
    assert (out.lr, out.weight_decay, out.adam_beta2, out.schedule, out.warmup_ratio, out.min_lr_ratio) == \
        (1e-4, 0.01, 0.98, "cosine", 0.2, 0.0)
    assert (out.head_lr_mult, out.grad_clip, out.epochs, out.augment, model) == (2.0, 3.0, 10.0, "flip", {"image_size": 384})
    # a resumed run keeps its checkpoint's resolution; --recipe none keeps this project's defaults
    assert finetune.settle({"task": "nlvr2"}, base, fresh=False)[1] == {}
    assert finetune.settle({"task": "nlvr2", "recipe": "none"}, base) == (replace(default, recipe="none"), {})
    # the tiny preset: the shapes table on the shapes world, nothing on own data
    tiny = make_config("tiny")
    assert finetune.settle({"task": "nlvr2"}, tiny) == (replace(default, epochs=4.0), {})
    assert finetune.settle({"task": "nlvr2", "train_json": "a.json"}, tiny) == (replace(default, train_json="a.json"), {})
    vqa, model = finetune.settle({"task": "vqa", "recipe": "official", "image_size": 64}, tiny)
    assert (vqa.lr, vqa.head_lr_mult, vqa.schedule, vqa.augment, model["image_size"]) == (3e-5, 10.0, "linear", "randaug", 64)
    with pytest.raises(SystemExit, match="--recipe"):
        finetune.settle({"task": "nlvr2", "recipe": "paper"}, base)


def test_finetune_official_recipe_gives_the_optimizer_exactly_its_values(small_world, tmp_path, monkeypatch):
    made = {}
    real = training.make_optimizer

    def spy(model, tc, **kw):
        made["tc"], (made["opt"], made["sched"]) = tc, real(model, tc, **kw)
        return made["opt"], made["sched"]

    monkeypatch.setattr(training, "make_optimizer", spy)
    w = small_world
    paths = [x for s in ("train", "val", "test") for x in (f"--{s}-json", str(w[f"vqa_{s}"]))]
    finetune.main(["--task", "vqa", *paths, "--image-root", str(w["root"]), "--vocab", str(w["vocab"]),
                   "--answer-list", str(w["answer_list"]), "--min-answer-count", "1", "--out-dir", str(tmp_path),
                   "--max-steps", "10", "--batch-size", "4", "--num-workers", "0", "--recipe", "official"]
                  + TINY_MODEL_FLAGS)
    opt, sched, tc = made["opt"], made["sched"], made["tc"]
    assert sorted({g["initial_lr"] for g in opt.param_groups}) == pytest.approx([3e-5, 3e-4])  # head lr_mult 10
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.98)}
    assert (tc.grad_clip, tc.warmup_steps, tc.augment) == (3.0, 1, "randaug")  # warm-up int(0.1 x 10)
    # the official linear schedule (scheduler.py): step / warm-up, then (total - step) / (total - warm-up), down to 0
    factor = sched.lr_lambdas[0]
    assert [factor(s) for s in range(11)] == pytest.approx([1.0] + [(10 - s) / 9 for s in range(1, 11)])


# ---- another resolution than pre-training ------------------------------------------------------------------------

def resized_by_hand(pos, grid):
    """Reference: the [CLS] row kept, the patch rows as a (D, g, g) picture resized bicubically by F.interpolate."""
    g, D = math.isqrt(pos.shape[1] - 1), pos.shape[2]
    picture = pos[0, 1:].T.reshape(1, D, g, g)
    resized = F.interpolate(picture, size=(grid, grid), mode="bicubic", align_corners=False)[0].reshape(D, -1).T
    return torch.cat([pos[0, :1], resized])[None]


def test_own_checkpoint_pretrained_at_32px_finetunes_at_48px(small_world, tmp_path, capsys):
    w = small_world
    pretrain.main(["--train-json", str(w["pretrain"]), "--image-root", str(w["root"]), "--vocab", str(w["vocab"]),
                   "--out-dir", str(tmp_path / "pt"), "--max-steps", "1", "--batch-size", "4", "--num-workers", "0"]
                  + TINY_MODEL_FLAGS)
    ckpt = checkpoints.load_checkpoint(tmp_path / "pt" / "last.pt")
    model = EVEWithHeads(replace(EVEConfig.from_dict(ckpt["config"]), image_size=48))
    finetune.load_init(model, ckpt, "last.pt", verbose=False)
    for name, ours in (("image_pos", model.image_pos), ("decoder.pos_embed", model.decoder.pos_embed)):
        assert ours.shape[1] == 1 + 6 * 6
        torch.testing.assert_close(ours.data, resized_by_hand(ckpt["model"][name], 6), rtol=0, atol=1e-6)
    assert torch.equal(model.blocks[0].attn.qkv.weight, ckpt["model"]["blocks.0.attn.qkv.weight"])
    # and the whole command: one fine-tuning step at 48 px from the 32 px checkpoint
    paths = [x for s in ("train", "val", "test") for x in (f"--{s}-json", str(w[f"nlvr2_{s}"]))]
    finetune.main(["--task", "nlvr2", *paths, "--image-root", str(w["root"]), "--init", str(tmp_path / "pt" / "last.pt"),
                   "--out-dir", str(tmp_path / "ft"), "--max-steps", "1", "--batch-size", "4", "--num-workers", "0",
                   "--image-size", "48"])
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert best["config"]["image_size"] == 48 and best["model"]["image_pos"].shape == (1, 37, 64)


# ---- the NLVR2 bi-attention head --------------------------------------------------------------------------------

def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours, ref = CrossAttention(16, 4), nn.MultiheadAttention(16, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())  # the same names (the official head's are those of nn.MultiheadAttention)
    x, ctx = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 4:] = valid[2, 6:] = False
    want, _ = ref(x, ctx, ctx, key_padding_mask=~valid)
    torch.testing.assert_close(ours(x, ctx, valid), want, rtol=1e-5, atol=1e-6)


def test_biattn_head_shapes_gradients_and_padding():
    torch.manual_seed(0)
    model = EVEWithHeads(tiny_cfg(), nlvr2_head="biattn")
    assert isinstance(model.nlvr2_head, NLVR2BiAttention)
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    batch = {"image0": torch.randn(3, 3, 32, 32), "image1": torch.randn(3, 3, 32, 32), "text_ids": ids,
             "text_mask": mask, "label": torch.tensor([0, 1, 1])}
    out, _, _ = model.loss_nlvr2(batch)
    assert out["logits"].shape == (3, 2)
    out["loss_nlvr2"].backward()
    for name, p in model.nlvr2_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # through both passes into the encoder
    # padding is invisible: other ids at the padded places of sample 1 give the same logits
    model.eval()
    before = model.nlvr2_logits(batch["image0"], batch["image1"], ids, mask)[0]
    ids2 = ids.clone()
    ids2[1, 4:] = 7
    torch.testing.assert_close(model.nlvr2_logits(batch["image0"], batch["image1"], ids2, mask)[0], before)
    # attention pooling by hand: softmax of relu(score) over the valid tokens, weighted sum
    head, x = model.nlvr2_head, torch.randn(2, 4, 32)
    valid = torch.tensor([[True, True, False, True], [True, False, False, False]])
    score = torch.relu(x @ head.pool[0].weight[0] + head.pool[0].bias)
    weights = torch.where(valid, score.exp(), torch.zeros(())) / torch.where(valid, score.exp(), torch.zeros(())).sum(1, keepdim=True)
    torch.testing.assert_close(head.attention_pool(x, valid), (weights[..., None] * x).sum(1))


def test_official_biattn_tensors_map_onto_the_head():
    sd = official_state_dict()
    D = 32
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for k in ("output.0.weight", "output.0.bias", "output.1.weight", "output.1.bias", "output.3.weight", "output.3.bias"):
        del sd[k]  # an NLVR2 model fine-tuned with --biattn has no "output" MLP
    head = {f"attn{j}.in_proj_weight": r(3 * D, D) for j in (1, 2)} | {f"attn{j}.in_proj_bias": r(3 * D) for j in (1, 2)}
    head |= {f"attn{j}.out_proj.weight": r(D, D) for j in (1, 2)} | {f"attn{j}.out_proj.bias": r(D) for j in (1, 2)}
    head |= {"fc.0.weight": r(D, 2 * D), "fc.0.bias": r(D), "attn_pool.fc.0.weight": r(1, D),
             "attn_pool.fc.0.bias": r(1), "nlvr2_output.weight": r(2, 2 * D), "nlvr2_output.bias": r(2)}
    sd |= head
    cfg = official.official_config(sd, heads=4)
    assert official.official_nlvr2_head(sd) == "biattn"  # read off the checkpoint
    model = EVEWithHeads(cfg, nlvr2_head="biattn")
    model.load_state_dict(official.convert(sd, model, verbose=False), strict=False)
    h = model.nlvr2_head
    pairs = [(h.attn1.in_proj_weight, "attn1.in_proj_weight"), (h.attn2.in_proj_bias, "attn2.in_proj_bias"),
             (h.attn2.out_proj.weight, "attn2.out_proj.weight"), (h.fc[0].weight, "fc.0.weight"),
             (h.pool[0].bias, "attn_pool.fc.0.bias"), (h.out.weight, "nlvr2_output.weight")]
    for ours, name in pairs:
        assert torch.equal(ours, sd[name]), name
    assert len(head) == sum(1 for _ in h.parameters())  # every head tensor has its official counterpart


# ---- fine-tuning augmentation ----------------------------------------------------------------------------------

@pytest.fixture()
def halves(tmp_path):
    """A picture red on its left half, blue on its right half, and a green one."""
    arr = np.zeros((40, 40, 3), np.uint8)
    arr[:, :20, 0] = arr[:, 20:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "halves.png")
    Image.new("RGB", (40, 40), (0, 255, 0)).save(tmp_path / "green.png")
    return tmp_path


def sides(image):
    """'red'/'blue' of the leftmost and rightmost columns of a normalised (3, S, S) image."""
    colour = lambda col: "red" if col[0].mean() > col[2].mean() else "blue"  # noqa: E731
    return colour(image[:, :, 0]), colour(image[:, :, -1])


def test_flip_swaps_left_and_right_in_the_text(halves):
    import json
    (halves / "vqa.json").write_text(json.dumps([{"question_id": i, "question": "What is on the left?", "image": "halves.png",
                                                  "answer": ["red left"]} for i in range(16)]))
    ds = data.VQADataset(halves / "vqa.json", halves, 24, augment="flip", seed=3)
    seen = set()
    for i in range(16):
        item = ds[i]
        flipped = item["text"] == "What is on the right?"
        assert sides(item["image"]) == (("blue", "red") if flipped else ("red", "blue"))  # the crop keeps >= 61% width
        assert item["answers"] == (["red right"] if flipped else ["red left"])
        seen.add(flipped)
        assert torch.equal(ds[i]["image"], item["image"])  # a pure function of (seed, epoch, index)
    assert seen == {True, False}
    assert data.VQADataset(halves / "vqa.json", halves, 24)[0]["text"] == "What is on the left?"  # default: none

    (halves / "nlvr2.json").write_text(json.dumps([{"images": ["halves.png", "green.png"], "label": "True",
                                                    "sentence": "The left image is red on the left."}] * 16))
    pairs = data.NLVR2Dataset(halves / "nlvr2.json", halves, 24, augment="flip", seed=0)
    flips = 0
    for i in range(16):
        item = pairs[i]
        if item["text"] == "The right image is red on the right.":  # the pair mirrored as a whole
            flips += 1
            assert item["image0"][1].mean() > 0.9 and sides(item["image1"]) == ("blue", "red")
        else:
            assert sides(item["image0"]) == ("red", "blue") and item["image1"][1].mean() > 0.9
    assert 0 < flips < 16


def test_crop_box_colour_jitter_and_randaugment():
    rng = random.Random(0)
    for _ in range(200):
        left, top, w, h = augment.random_crop_box(rng, (0.5, 1.0))
        assert 0 <= left and left + w <= 1 + 1e-9 and 0 <= top and top + h <= 1 + 1e-9 and w * h <= 1.0
        assert w * h >= 0.5 * 0.75 - 1e-9  # clipping a side to the image can lose area, never below 3/4 of 0.5
    img = Image.new("RGB", (32, 32), (100, 150, 200))
    img.putpixel((20, 10), (255, 255, 255))
    # PIL's affine transform reads input (x + 7, y) for output (x, y): content moves 7 px left (sign +1)
    moved = augment.RANDAUG_OPS["translate_x"](img, 1)
    assert moved.getpixel((13, 10)) == (255, 255, 255) and moved.getpixel((29, 10)) == augment.RANDAUG_FILL
    assert augment.RANDAUG_OPS["identity"](img, 1) is img
    for mode in augment.AUGMENTS:
        for seed in range(20):
            crop, transform = augment.augment_draws(random.Random(seed), mode)
            assert (crop is None) == (mode == "none") and (transform is None) == (mode in ("none", "flip"))
            if transform:
                out = transform(img)
                assert out.size == img.size and out.mode == "RGB"
    # colour jitter of a grey picture with brightness only: the factor is within 1 +- 0.4
    jitter = augment.colour_jitter(random.Random(5))
    factor = np.asarray(jitter(Image.new("RGB", (8, 8), (100, 100, 100))), np.float64).mean() / 100
    assert 0.6 - 0.02 <= factor <= 1.4 + 0.02
