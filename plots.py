"""Charts of numbers, drawn with pillow: training and validation curves from metrics.jsonl files, the concept
probe's curves, and bar charts with the spread of seeds (ablate.py's claims).

One drawing path serves them all: a chart is a list of Panels (lines against the step, or bars), a legend and
notes, laid out by save_chart; each panel has axes with round tick values labelled in pillow's default font.
The commands (pictures.py passes them on):
    python pictures.py curves runs/pretrain/metrics.jsonl runs/pretrain_itc/metrics.jsonl --out curves.png
    python pictures.py curves runs/ft_scratch/metrics.jsonl runs/ft_pretrained/metrics.jsonl --labels scratch,pre-trained
    python pictures.py curves runs/pretrain/metrics.jsonl --keys loss_mim,loss_mlm,grad_norm --out parts.png
    python pictures.py concepts runs/pretrain/metrics.jsonl --out concepts.png
"""
import argparse
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import evaluate

# well-separated colours, one per run (or per concept kind), in this order
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]
GRID, AXES = "#e4e4e4", "black"


def font(size=12):
    try:  # pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size)
    except (TypeError, OSError):
        return ImageFont.load_default()


@dataclass
class Line:
    label: str
    colour: str
    points: list  # [(x, y), ...] in x order
    dashed: bool = False


@dataclass
class Bar:
    """One bar: the mean of `values` (e.g. one per seed), their sample standard deviation as an error bar, each
    value as a dot."""
    label: str
    colour: str
    values: list


@dataclass
class Panel:
    title: str
    lines: list = field(default_factory=list)  # Line: x is the step
    bars: list = field(default_factory=list)  # Bar: one slot each, from 0
    y_range: tuple = None  # (lo, hi) to show at least, else the data's; rounded out to tick values


# ----------------------------------------------------------------------------- drawing
def nice_ticks(lo, hi, n=5):
    """About n round tick values (a step of 1, 2, 2.5 or 5 times a power of ten), the first at or below lo and
    the last at or above hi: the axis spans exactly first..last."""
    if hi <= lo:  # one value: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / (n - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_labels(ticks):
    """Tick values as text, all in one style: as 5.0e-04 when the largest is below 0.01 (a learning rate), with as
    many digits as the values need (1.000e-03, 1.025e-03); else as 2.5 or 100."""
    largest = max(abs(t) for t in ticks)
    if not 0 < largest < 0.01:
        return [f"{t:g}" for t in ticks]
    for digits in range(1, 7):
        labels = ["0" if t == 0 else f"{t:.{digits}e}" for t in ticks]
        if all(abs(float(label) - t) <= 1e-9 * largest for label, t in zip(labels, ticks)):
            return labels
    return labels


def _polyline(draw, points, colour, width, dashed):
    """A line through the points (pixels); dashed: 7 pixels on, 5 off, continued from segment to segment."""
    if not dashed:
        draw.line(points, fill=colour, width=width, joint="curve")
        return
    on, period, done = 7.0, 12.0, 0.0
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length, t = math.hypot(xb - xa, yb - ya), 0.0
        while t < length:
            phase = done % period
            end = min(length, t + (on - phase if phase < on else period - phase))
            if phase < on:
                at = lambda s: (xa + (xb - xa) * s / length, ya + (yb - ya) * s / length)  # noqa: E731
                draw.line([at(t), at(end)], fill=colour, width=width)
            done, t = done + end - t, end


def draw_panel(draw, box, panel, f, small):
    """A panel in box (x0, y0, x1, y1): title, y axis with round ticks and a grid, its lines or bars, the axes.
    Returns the plot area (left, top, right, bottom) in pixels."""
    x0, y0, x1, y1 = box
    area = left, top, right, bottom = x0 + 56, y0 + 22, x1 - 14, y1 - (46 if panel.bars else 34)
    draw.text((left, y0 + 3), panel.title, fill="black", font=f)
    ys = [y for line in panel.lines for _, y in line.points] + list(panel.y_range or ())
    for bar in panel.bars:  # from 0, with room above the error bar for its label
        mean, sd = mean_sd(bar.values)
        ys += [0.0, *bar.values, (mean + sd) * 1.08]
    y_ticks = nice_ticks(min(ys), max(ys))
    sy = lambda y: bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)  # noqa: E731
    for y, label in zip(y_ticks, tick_labels(y_ticks)):
        draw.line([left, sy(y), right, sy(y)], fill=GRID)
        draw.text((left - 6 - draw.textlength(label, font=small), sy(y) - 6), label, fill="black", font=small)
    if panel.lines:
        _draw_lines(draw, area, panel.lines, sy, small)
    if panel.bars:
        _draw_bars(draw, area, panel.bars, sy, small)
    draw.line([left, top, left, bottom], fill=AXES)  # the axes last, over the grid and the lines
    draw.line([left, bottom, right, bottom], fill=AXES)
    return area


def _draw_lines(draw, area, lines, sy, small):
    """The lines against the step (x axis from 0, round ticks, a grid); sy: value -> pixel row."""
    left, top, right, bottom = area
    xs = [x for line in lines for x, _ in line.points]
    x_ticks = nice_ticks(min(0, min(xs)), max(xs), 6)  # steps from 0: runs logged from different steps line up
    sx = lambda x: left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)  # noqa: E731
    for x, label in zip(x_ticks, tick_labels(x_ticks)):
        draw.line([sx(x), top, sx(x), bottom], fill=GRID)
        draw.text((sx(x) - draw.textlength(label, font=small) / 2, bottom + 4), label, fill="black", font=small)
    draw.text(((left + right) / 2 - 12, bottom + 18), "step", fill="black", font=small)
    for line in lines:
        pixels = [(sx(x), sy(y)) for x, y in line.points]
        if len(pixels) == 1:  # one evaluation: a dot
            (px, py), = pixels
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=line.colour)
        else:
            _polyline(draw, pixels, line.colour, 2, line.dashed)


def _draw_bars(draw, area, bars, sy, small):
    """One slot per bar: the mean as a bar from 0, the sample standard deviation as an error bar, each value as a
    dot, the mean ± sd above and the label below; sy: value -> pixel row."""
    left, _, right, bottom = area
    slot = (right - left) / len(bars)
    for i, bar in enumerate(bars):
        mean, sd = mean_sd(bar.values)
        cx = left + (i + 0.5) * slot
        draw.rectangle([cx - slot * 0.3, sy(mean), cx + slot * 0.3, sy(0)], fill=bar.colour)
        draw.line([cx, sy(mean + sd), cx, sy(mean - sd)], fill="black", width=2)
        for cap in (mean + sd, mean - sd):
            draw.line([cx - 6, sy(cap), cx + 6, sy(cap)], fill="black", width=2)
        for j, v in enumerate(bar.values):  # each seed, spread sideways so that equal values stay apart
            dx = (j - (len(bar.values) - 1) / 2) * 7
            draw.ellipse([cx + dx - 3, sy(v) - 3, cx + dx + 3, sy(v) + 3], fill="white", outline="black")
        text = f"{mean:.1f} ± {sd:.1f}"
        draw.text((cx - draw.textlength(text, font=small) / 2, sy(mean + sd) - 15), text, fill="black", font=small)
        for k, words in enumerate(_wrap(bar.label, slot - 4, draw, small)[:2]):
            draw.text((cx - draw.textlength(words, font=small) / 2, bottom + 4 + 13 * k), words, fill="black", font=small)


def mean_sd(values):
    """The mean and the sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _wrap(text, width, draw, f):
    """Words of text in lines no wider than width (a longer word stays whole)."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=f) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _legend(draw, entries, x, y, width, f):
    """Entries (label, colour, dashed) from (x, y) left to right, wrapping at width; returns the height used.
    draw None: only measures."""
    cx, height = x, 18
    for label, colour, dashed in entries:
        w = 30 + math.ceil(f.getlength(label)) + 16  # whole pixels: the text is drawn as it is measured
        if cx + w > x + width and cx > x:
            cx, y, height = x, y + 18, height + 18
        if draw is not None:
            _polyline(draw, [(cx, y + 7), (cx + 24, y + 7)], colour, 3, dashed)
            draw.text((cx + 30, y), label, fill="black", font=f)
        cx += w
    return height if entries else 0


def save_chart(path, panels, legend=(), notes=(), cols=2, size=(430, 260)):
    """PNG of the panels in a grid (cols per row), the legend (label, colour, dashed) across the top and notes
    (lines of text) below; written to a temporary file, then renamed."""
    f, small = font(13), font(11)
    cols = min(cols, len(panels))
    width = cols * size[0] + 10
    legend_h = _legend(None, legend, 10, 0, width - 20, f)
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (width, 8 + legend_h + 6 + rows * size[1] + 16 * len(notes) + 10), "white")
    draw = ImageDraw.Draw(img)
    _legend(draw, legend, 10, 8, width - 20, f)
    top = 8 + legend_h + 6
    for i, panel in enumerate(panels):
        x, y = 5 + (i % cols) * size[0], top + (i // cols) * size[1]
        draw_panel(draw, (x, y, x + size[0], y + size[1]), panel, f, small)
    for k, note in enumerate(notes):
        draw.text((10, top + rows * size[1] + 16 * k), note, fill="black", font=small)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return img


# ----------------------------------------------------------------------------- metrics.jsonl
def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (training.MetricsLog's); a bad line is an error naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    records = []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {i}: expected a JSON object")
        records.append(record)
    return records


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def quantities(records) -> list[str]:
    """Every quantity logged against a step, in order of appearance: a record's numeric key ("loss_mim", "lr"), or
    split:key for an evaluation record ("val:vqa_accuracy")."""
    names = {}
    for r in records:
        if "step" in r:
            names.update({f"{r['split']}:{k}" if "split" in r else k: None for k, v in r.items()
                          if k != "step" and _number(v)})
    return list(names)


def series(records, name) -> list[tuple]:
    """[(step, value)] of one quantity (see quantities), in step order; a step logged twice (a resumed run
    logs again from its checkpoint) keeps the later value."""
    split, _, key = name.rpartition(":")
    out = {}
    for r in records:
        if "step" in r and r.get("split", "") == split and _number(r.get(key)):
            out[r["step"]] = r[key]
    return sorted(out.items())


def default_quantities(names) -> list[str]:
    """The curves worth a look: each loss part, the learning rate, pre-training's reconstruction diagnostic,
    and the validation metric that picks a fine-tuning run's best checkpoint."""
    picked = ["loss"] + sorted(n for n in names if n.startswith("loss_")) + ["lr", "recon_fg_ratio"]
    picked += [f"val:{task.metric}" for task in evaluate.TASKS.values()]
    return [n for n in picked if n in names]


def run_labels(paths) -> list[str]:
    """A short unique name per file: its folder, with as many parent folders as tell the runs apart."""
    parts = [Path(p).resolve().parent.parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def save_curves(path, runs, names=None, cols=2):
    """One panel per quantity (names, default default_quantities), one line per run in its own colour.
    runs: [(label, records)]. Returns the quantities drawn."""
    present = list(dict.fromkeys(n for _, records in runs for n in quantities(records)))
    names = names or default_quantities(present)
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise ValueError(f"no run logged {', '.join(missing) or 'any of the default curves'}; "
                         f"they logged: {', '.join(present)}")
    colours = {label: COLOURS[i % len(COLOURS)] for i, (label, _) in enumerate(runs)}
    title = lambda n: "{2} ({0})".format(*n.partition(":")) if ":" in n else n  # noqa: E731  "vqa_accuracy (val)"
    panels = [Panel(title(n), [Line(label, colours[label], series(records, n)) for label, records in runs
                               if series(records, n)]) for n in names]
    save_chart(path, panels, [(label, colours[label], False) for label, _ in runs], cols=cols)
    return names


def save_concepts(path, runs, cols=2):
    """The concept probe against the step: one panel per run, one line per kind (probe_<kind>, accuracy in
    percent with the image) in its own colour, the same kind from the text alone (probe_<kind>_text) dashed."""
    kinds = list(dict.fromkeys(n[len("probe_"):] for _, records in runs for n in quantities(records)
                               if n.startswith("probe_") and not n.endswith("_text")))
    if not kinds:
        raise ValueError("no probe_<kind> records: pre-train with --probe-every")
    colours = {kind: COLOURS[i % len(COLOURS)] for i, kind in enumerate(kinds)}
    panels = [Panel(f"{label}: concept probe accuracy (%)", [
        Line(kind + suffix, colours[kind], series(records, f"probe_{kind}{suffix}"), dashed=bool(suffix))
        for kind in kinds for suffix in ("", "_text") if series(records, f"probe_{kind}{suffix}")], y_range=(0, 100))
        for label, records in runs]
    legend = [(kind, colours[kind], False) for kind in kinds] + [("text only (same colour)", "#555555", True)]
    save_chart(path, panels, legend, cols=cols, size=(640, 380))  # one panel of many lines: a larger one
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pictures.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("curves", "training and validation curves, runs overlaid"),
                       ("concepts", "the concept probe's accuracy per kind, with the image and text only")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("metrics", nargs="+", help="metrics.jsonl files, one per run")
        p.add_argument("--out", default=f"{name}.png", help="the PNG to write")
        p.add_argument("--labels", help="comma-separated run names (default: the files' folders)")
        p.add_argument("--cols", type=int, default=2, help="panels per row")
        if name == "curves":
            p.add_argument("--keys", help="comma-separated quantities, as logged (loss_mim, lr, grad_norm) or "
                           "split:key for evaluations (val:vqa_accuracy) (default: loss parts, lr, the val metric)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else run_labels(args.metrics)
    if len(labels) != len(args.metrics):
        parser.error(f"--labels names {len(labels)} runs for {len(args.metrics)} files")
    try:
        runs = list(zip(labels, (read_metrics(p) for p in args.metrics)))
        if args.command == "curves":
            drawn = save_curves(args.out, runs, args.keys.split(",") if args.keys else None, args.cols)
        else:
            drawn = save_concepts(args.out, runs, args.cols)
    except ValueError as e:
        parser.error(str(e))
    print(f"{args.command} of {', '.join(labels)} ({', '.join(drawn)}): {args.out}")
