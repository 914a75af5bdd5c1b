"""Tests of pictures.py, the reconstruction diagnostic and plots.py's charts: colours where the picture says, ratios
by hand, curves where the values are."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import pictures
import plots
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


# ---- charts of metrics.jsonl files (plots.py, through pictures.py's command line) -------------
BLACK = np.array([0, 0, 0])


def rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def plot_area(png):
    """(left, top, right, bottom) of the first panel, found from the picture alone: its y axis is the longest
    vertical black line, its x axis the longest horizontal one."""
    black = (png == BLACK).all(-1)

    def longest_run(mask_1d):
        best, start, run = (0, 0), 0, 0
        for i, v in enumerate(mask_1d):
            run, start = (run + 1, start) if v else (0, i + 1)
            best = max(best, (run, start))
        return best  # (length, first index)

    col = max(range(png.shape[1]), key=lambda c: longest_run(black[:, c])[0])
    length, top = longest_run(black[:, col])
    bottom = top + length - 1
    length, left = longest_run(black[bottom])
    return left, top, left + length - 1, bottom


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_nice_ticks_by_hand():
    assert plots.nice_ticks(0, 4) == [0, 1, 2, 3, 4]
    assert plots.nice_ticks(0.13, 0.38) == [0.1, 0.2, 0.3, 0.4]  # step 0.1: 0.05 would need 6+ ticks
    assert plots.nice_ticks(3, 93, 6) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(2, 2) == [1.8, 1.9, 2.0, 2.1, 2.2]  # one value: a range around it
    assert plots.tick_labels([0, 0.0005, 0.001]) == ["0", "5.0e-04", "1.0e-03"]
    assert plots.tick_labels([0.001, 0.00105, 0.0011]) == ["1.00e-03", "1.05e-03", "1.10e-03"]
    assert plots.tick_labels([0.001, 0.001025]) == ["1.000e-03", "1.025e-03"]
    assert plots.tick_labels([0, 2.5, 5]) == ["0", "2.5", "5"]


def test_curves_put_each_run_where_its_values_are(tmp_path):
    """A ramp 0..4 and a constant 2 over steps 0..100 share a panel whose axes span 0..4 and 0..100 (round
    numbers): the constant is a horizontal line at mid-height across the whole plot, the ramp passes through
    mid-height at mid-width and through a quarter of the height at a quarter of the width."""
    ramp = write_jsonl(tmp_path / "ramp" / "metrics.jsonl", [{"step": s, "loss": s / 25} for s in range(0, 101, 5)])
    flat = write_jsonl(tmp_path / "flat" / "metrics.jsonl", [{"step": s, "loss": 2.0} for s in range(0, 101, 10)])
    out = tmp_path / "curves.png"
    pictures.main(["curves", str(ramp), str(flat), "--out", str(out)])
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert png.shape == (8 + 18 + 6 + 260 + 10, 430 + 10, 3)  # one panel under a one-row legend
    left, top, right, bottom = plot_area(png)
    assert right - left > 300 and bottom - top > 150
    inside = png[top:bottom, left + 1:right]  # without the axes
    near = lambda colour: (np.abs(inside - rgb(colour)).sum(-1) < 60)  # noqa: E731  (anti-aliased edges)
    ramp_colour, flat_colour = plots.COLOURS[0], plots.COLOURS[1]  # in the order of the files
    rows, cols = np.nonzero(near(flat_colour))
    mid = (bottom - top) / 2
    assert abs(rows.min() - mid) <= 1.5 and abs(rows.max() - mid) <= 1.5  # horizontal, at the value 2
    assert cols.min() <= 2 and cols.max() >= right - left - 4  # from step 0 to step 100
    for fraction in (0.25, 0.5):
        x = round(fraction * (right - left)) - 1
        hit = np.nonzero(near(ramp_colour)[:, x - 1:x + 2].any(1))[0]
        expected = (1 - fraction) * (bottom - top)
        assert len(hit) and abs(hit.mean() - expected) <= 2.5, (fraction, hit, expected)


def find(template, picture):
    """Whether template (2-D grey) appears exactly somewhere in picture (2-D grey)."""
    h, w = template.shape
    windows = np.lib.stride_tricks.sliding_window_view(picture, (h, w))
    return bool((windows == template).all((-1, -2)).any())


def test_legend_lists_the_runs_by_folder_or_label(tmp_path):
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    paths = [write_jsonl(tmp_path / name / "metrics.jsonl", records) for name in ("scratch", "pretrained")]
    assert plots.run_labels(paths) == ["scratch", "pretrained"]
    assert plots.run_labels([tmp_path / "a" / "x" / "m.jsonl", tmp_path / "b" / "x" / "m.jsonl"]) == ["a/x", "b/x"]
    for labels, expected in ((None, ["scratch", "pretrained"]), ("from scratch,pre-trained", ["from scratch", "pre-trained"])):
        out = tmp_path / "legend.png"
        pictures.main(["curves", *map(str, paths), "--out", str(out)] + (["--labels", labels] if labels else []))
        band = np.asarray(Image.open(out).convert("L"))[:30]  # the legend: one row at the top
        for label in expected:  # the label as pillow writes it in that font, black on white, found in the band
            text = Image.new("L", (300, 24), 255)
            ImageDraw.Draw(text).text((0, 0), label, fill=0, font=plots.font(13))
            ink = np.asarray(text)
            ys, xs = np.nonzero(ink < 255)
            assert find(ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1], band), label
    colours = np.asarray(Image.open(out).convert("RGB"))[:30].reshape(-1, 3)
    assert all((colours == rgb(c)).all(-1).any() for c in plots.COLOURS[:2])  # each run's swatch


def test_concepts_one_colour_per_kind_and_the_text_control_dashed(tmp_path):
    """shape at 80 % with the image and 40 % from the text alone, colour at 60 %: the 80 line is solid, the 40
    line of the same colour is broken into dashes, the axis spans 0..100."""
    records = [{"step": s, "loss": 1.0} for s in range(0, 101, 10)]
    records += [{"step": s, "probe_shape": 80.0, "probe_shape_text": 40.0, "probe_colour": 60.0} for s in range(0, 101, 20)]
    metrics = write_jsonl(tmp_path / "run" / "metrics.jsonl", records)
    out = tmp_path / "concepts.png"
    pictures.main(["concepts", str(metrics), "--out", str(out)])
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    left, top, right, bottom = plot_area(png)
    shape = (np.abs(png - rgb(plots.COLOURS[0])).sum(-1) < 30)[:, left + 3:right - 3]
    for value, dashed in ((80, False), (40, True)):
        y = round(bottom - value / 100 * (bottom - top))
        row = shape[y - 1:y + 2].any(0)
        assert row.mean() > (0.5 if dashed else 0.97) and (row.mean() < 0.75) == dashed, (value, row.mean())
    colour_row = round(bottom - 0.6 * (bottom - top))
    assert (np.abs(png[colour_row - 1:colour_row + 2, left + 5:right - 5] - rgb(plots.COLOURS[1])).sum(-1) < 30).any()
    with pytest.raises(SystemExit):  # no probe records: an error, not an empty picture
        pictures.main(["concepts", str(write_jsonl(tmp_path / "plain" / "metrics.jsonl", records[:3])), "--out", str(out)])


def test_metrics_series_keep_the_resumed_value_and_split_names():
    records = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"epoch": 0, "skipped": {}},
               {"step": 10, "loss": 2.5},  # a resumed run logs step 10 again
               {"step": 20, "split": "val", "vqa_accuracy": 50.0, "n": 8}, {"step": 30, "loss": float("nan")}]
    assert plots.series(records, "loss") == [(10, 2.5), (20, 2.0)]
    assert plots.series(records, "val:vqa_accuracy") == [(20, 50.0)]
    assert plots.quantities(records) == ["loss", "val:vqa_accuracy", "val:n"]
    assert plots.default_quantities(plots.quantities(records)) == ["loss", "val:vqa_accuracy"]
