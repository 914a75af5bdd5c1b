"""Tests of pictures.py and of the reconstruction diagnostic: colours where the picture says, ratios by hand."""
import numpy as np
import torch
from PIL import Image

import pictures
from model import EVE, make_config
from tokenization import WordPieceTokenizer
from conftest import VOCAB


def test_foreground_ratio_by_hand():
    """A grey image with one red 8x8 patch: predicting the patch exactly gives 0, painting it in the
    background colour gives 1, halfway gives 1/4 (squared error); visible or plain patches do not count."""
    cfg = make_config("tiny")  # 64 px, patch 8: 64 patches
    images = torch.full((1, 3, 64, 64), -0.5)  # grey background in normalised units
    images[0, :, 8:16, 16:24] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]  # patch 1 * 8 + 2 = 10 is red
    from masking import patchify
    target = patchify(images, 8)  # (1, 64, 192)
    background = torch.full_like(target, -0.5)
    mask = torch.zeros(1, 64)
    mask[0, [10, 11, 40]] = 1  # removed: the red patch and two grey ones
    ratio = lambda pred: pictures.foreground_ratio(images, pred, mask, cfg)  # noqa: E731
    assert ratio(target) == 0.0
    assert abs(ratio(background) - 1.0) < 1e-6
    assert abs(ratio((target + background) / 2) - 0.25) < 1e-6
    wrong_elsewhere = target.clone()
    wrong_elsewhere[0, 40] += 1.0  # an error on a removed grey patch does not count
    assert ratio(wrong_elsewhere) == 0.0
    mask[0, 10] = 0  # the red patch visible: nothing to score
    assert np.isnan(ratio(background))


def test_foreground_ratios_split_by_a_visible_object_patch_nearby():
    """Removed red patches 10 (row 1, col 2) and 50 (row 6, col 2); a visible red patch 11 beside 10, and
    a removed red patch 42 above 50 (removed, so not in sight): 10 is "near", 42 and 50 "far". Predicting 10
    exactly, 42 and 50 in the background colour: near 0, far 1, all 2/3 (equal background losses).
    A visible red patch diagonal to 50 (59: row 7, col 3) makes 50 near too."""
    from masking import patchify
    cfg = make_config("tiny")  # 64 px, patch 8: an 8x8 grid of patches
    images = torch.full((1, 3, 64, 64), -0.5)
    for k in (10, 11, 42, 50):
        r, c = divmod(k, 8)
        images[0, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]
    target = patchify(images, 8)
    pred = target.clone()
    pred[0, [42, 50]] = -0.5  # 42 and 50 painted in the background colour
    mask = torch.zeros(1, 64)
    mask[0, [10, 42, 50]] = 1
    ratios = pictures.foreground_ratios(images, pred, mask, cfg)
    assert ratios["near"] == (0.0, 1)
    assert abs(ratios["far"][0] - 1.0) < 1e-6 and ratios["far"][1] == 2
    assert abs(ratios["all"][0] - 2 / 3) < 1e-6 and ratios["all"][1] == 3
    assert pictures.foreground_ratio(images, pred, mask, cfg) == ratios["all"][0]
    images[0, :, 56:64, 24:32] = torch.tensor([0.8, -0.8, -0.8])[:, None, None]  # patch 59, visible
    pred = patchify(images, 8)
    pred[0, [42, 50]] = -0.5
    ratios = pictures.foreground_ratios(images, pred, mask, cfg)
    assert ratios["near"][1] == 2 and abs(ratios["near"][0] - 0.5) < 1e-6
    assert ratios["far"][1] == 1 and abs(ratios["far"][0] - 1.0) < 1e-6


def test_nearest_visible_fill_copies_the_nearest_visible_pixel():
    """A row of three 8-pixel patches, red | removed | blue: removed columns 8-11 lie nearer to column 7 (red)
    than to column 16 (blue), columns 12-15 nearer to blue; visible patches keep their pixels. Nothing visible:
    the mean colour, 0."""
    from masking import patchify
    red, blue = torch.tensor([0.8, -0.8, -0.8]), torch.tensor([-0.8, -0.8, 0.8])
    images = torch.full((1, 3, 8, 24), 5.0)  # the removed patch's own pixels must not show through
    images[0, :, :, :8], images[0, :, :, 16:] = red[:, None, None], blue[:, None, None]
    expected = images.clone()
    expected[0, :, :, 8:12], expected[0, :, :, 12:16] = red[:, None, None], blue[:, None, None]
    fill = pictures.nearest_visible_fill(images, torch.tensor([[0.0, 1.0, 0.0]]), 8)
    assert torch.equal(fill, patchify(expected, 8))
    assert torch.equal(pictures.nearest_visible_fill(images, torch.ones(1, 3), 8), torch.zeros(1, 3, 192))
    assert torch.equal(pictures.nearest_visible_fill(images, torch.zeros(1, 3), 8), patchify(images, 8))


def test_routing_picture_tints_each_patch_by_its_first_expert(tmp_path):
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=len(VOCAB), dim=64, depth=2, heads=2, num_experts=4, top_layers=1)
    model = EVE(cfg)
    tok = WordPieceTokenizer(VOCAB)
    ids = torch.tensor([tok.encode("hello world"), tok.encode("hello") + [0]])
    mask = ids != 0
    images = torch.zeros(2, 3, 64, 64)  # mid grey after denormalisation
    experts = pictures.first_experts(model, images, ids, mask)
    assert len(experts) == 1 and experts[0].shape == (2, 1 + 64 + 4)
    grid = experts[0]
    assert grid[1, -1] == -1 and ((grid[0] >= 0) & (grid[0] < 4)).all()  # padding has no expert
    pictures.save_routing(tmp_path / "r.png", images, ids, mask, experts, tok, cfg, scale=4)
    png = np.asarray(Image.open(tmp_path / "r.png").convert("RGB")).astype(float)
    colours = pictures.expert_colours(4)
    for k in (0, 9, 63):  # the centre of patch k of the first pair: grey blended with its expert's colour
        r, c = divmod(k, 8)
        y, x = 40 + r * 32 + 16, 6 + c * 32 + 16
        expected = (1 - 110 / 255) * 127.5 + 110 / 255 * np.array(colours[int(grid[0, 1 + k])])
        assert np.abs(png[y, x] - expected).max() <= 2, (k, png[y, x], expected)


def test_expert_usage_picture(tmp_path):
    load = [torch.tensor([[10, 0, 5, 5], [0, 20, 0, 0]]), torch.tensor([[1, 1, 1, 1], [4, 0, 0, 0]])]
    pictures.save_expert_usage(tmp_path / "e.png", load)
    png = np.asarray(Image.open(tmp_path / "e.png").convert("RGB"))
    assert png.shape[0] > 2 * 110 and (png == [0x3B, 0x6F, 0xD4]).all(-1).any() and (png == [0xE8, 0x89, 0x2B]).all(-1).any()
