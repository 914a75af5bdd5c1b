"""ablate.py: the summary's means, sample spreads and verdicts against hand-made results; which runs it starts."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ablate
import plots


def arm(values, steps=0):
    return [dict(seed=i, scores={"vqa": v}, pretrain_steps=steps, pretrain_seconds=90.0 if steps else 0.0)
            for i, v in enumerate(values)]


def test_summary_means_spreads_and_claims():
    results = {"claims": {"scratch": arm([50.0, 52.0, 54.0]), "msm": arm([60.0, 61.0, 62.0], 100),
                          "itc_itm": arm([60.5, 61.0, 61.5], 20), "msm, no modality routing": arm([70.0, 71.0, 72.0], 90)}}
    text = ablate.summarise(results, ["vqa"])
    assert "| scratch | - | 52.0 ± 2.0 (50.0, 52.0, 54.0) |" in text  # sample standard deviation
    assert "| msm | 100 (90), 100 (90), 100 (90) | 61.0 ± 1.0" in text
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines[0] == ("- MSM pre-training > no pre-training, vqa: 61.0 vs 52.0, difference +9.0 "
                        "(larger seed spread 2.0): holds")
    assert lines[1].endswith("holds (equal within the seeds' spread)")  # >= : 61.0 vs 61.0
    assert lines[2].endswith("does not hold: reversed")  # 61 vs 71, beyond the spread


def test_strict_claim_within_spread_does_not_hold():
    results = {"objectives": {"scratch": arm([60.0, 62.0]), "msm": arm([61.0, 61.5], 10)}}
    line = [x for x in ablate.summarise(results, ["vqa"]).splitlines() if x.startswith("- ")][0]
    assert line.endswith("does not hold: equal within the seeds' spread")


def fake_runs(monkeypatch):
    """Replace the pretrain.py / finetune.py processes by stand-ins that write what the real ones write and
    record each call: (script, seed, init checkpoint or None, threads, flags)."""
    calls = []

    def run(script, *flags, threads=0):
        flags = [str(f) for f in flags]
        value = lambda name: flags[flags.index(name) + 1] if name in flags else None  # noqa: E731
        out = Path(value("--out-dir"))
        out.mkdir(parents=True, exist_ok=True)
        calls.append((script, value("--seed"), value("--init"), threads, flags))
        if script == "pretrain.py":  # 8 logged steps at 100 samples/s, then the step and seconds done
            rows = [{"step": i, "samples_per_s": 100.0} for i in range(8)] + [{"step": 40, "seconds": 30.0}]
            (out / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
        else:
            score = 60.0 + int(value("--seed")) + (5.0 if value("--init") else 0.0)
            (out / "results.json").write_text(json.dumps({"test": {"vqa_accuracy": score}}))

    monkeypatch.setattr(ablate, "run", run)
    return calls


def test_each_arm_pretrains_once_and_every_seed_fine_tunes_from_it(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch)
    ablate.main(["--table", "objectives", "--seeds", "3,4,5", "--pretrain-seconds", "30", "--jobs", "2",
                 "--out-dir", str(tmp_path)])
    budgeted = [c for c in calls if c[0] == "pretrain.py" and c[1] is not None]  # not the schedule probes
    assert sorted(c[1] for c in budgeted) == ["3", "3"]  # msm and itc_itm, each once, with the first seed
    tunes = [c for c in calls if c[0] == "finetune.py"]
    assert len(tunes) == 9 and {c[3] for c in tunes} == {max(1, (os.cpu_count() or 1) // 2)}
    inits = {c[2] for c in tunes if c[2]}
    assert inits == {str(tmp_path / "msm" / "seed3" / "pretrain" / "last.pt"),
                     str(tmp_path / "itc_itm" / "seed3" / "pretrain" / "last.pt")}
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("Each arm pre-trained once (seed 3)")
    assert "| scratch | - | 64.0 ± 1.0 (63.0, 64.0, 65.0) |" in text  # 60 + fine-tuning seed (+ 5 from a checkpoint)
    assert "| msm | 40 (30), 40 (30), 40 (30) | 69.0 ± 1.0 (68.0, 69.0, 70.0) |" in text
    assert Image.open(tmp_path / "results.png").size[0] > 300  # the bar chart beside the tables


def test_pretrain_per_seed(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch)
    ablate.main(["--table", "objectives", "--seeds", "0,1", "--pretrain-seconds", "30", "--pretrain-per-seed",
                 "--out-dir", str(tmp_path)])
    assert sorted(c[1] for c in calls if c[0] == "pretrain.py" and c[1] is not None) == ["0", "0", "1", "1"]
    assert {c[2] for c in calls if c[0] == "finetune.py" and c[1] == "1" and c[2]} == {
        str(tmp_path / "msm" / "seed1" / "pretrain" / "last.pt"), str(tmp_path / "itc_itm" / "seed1" / "pretrain" / "last.pt")}
    assert not (tmp_path / "results.md").read_text().startswith("Each arm pre-trained once")


def test_a_failed_fine_tuning_stops_the_rest(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch)
    stand_in = ablate.run

    def first_fails(script, *flags, threads=0):
        stand_in(script, *flags, threads=threads)
        if script == "finetune.py":
            if sum(c[0] == "finetune.py" for c in calls) == 1:
                raise SystemExit("error: finetune.py failed")
            time.sleep(0.5)  # the others take a while, as real runs do

    monkeypatch.setattr(ablate, "run", first_fails)
    with pytest.raises(SystemExit, match="finetune.py failed"):
        ablate.main(["--table", "objectives", "--seeds", "0,1,2", "--pretrain-seconds", "30", "--jobs", "1",
                     "--out-dir", str(tmp_path)])
    # the failed run and at most the one the worker had already taken, not all 9
    assert len([c for c in calls if c[0] == "finetune.py"]) <= 2


def test_budgeted_arms_share_one_batch_and_the_defaults_table_keeps_pretrain_s_own(monkeypatch, tmp_path):
    calls = fake_runs(monkeypatch)
    ablate.main(["--table", "objectives", "--seeds", "0", "--pretrain-seconds", "30", "--out-dir", str(tmp_path / "a")])
    budgeted = [c[4] for c in calls if c[0] == "pretrain.py"]
    assert len(budgeted) == 4 and all(f[f.index("--batch-size") + 1] == "64" for f in budgeted)  # probes and runs
    calls.clear()
    ablate.main(["--table", "defaults", "--seeds", "0", "--pretrain-seconds", "0", "--vqa-steps", "0",
                 "--out-dir", str(tmp_path / "b")])
    own = [c[4] for c in calls if c[0] == "pretrain.py"]
    assert len(own) == 1 and not {"--batch-size", "--max-steps", "--max-seconds"} & set(own[0])


def test_bar_chart_of_the_claims(tmp_path):
    """Two arms at 50 and 30 (no spread): the axis runs 0..60 (the top error bar and its label need room above
    50), so the bars reach 5/6 and 1/2 of the plot's height; found from the picture alone (the axes are the
    longest black lines). Then the same picture again from results.json with --picture-from."""
    results = {"objectives": {"scratch": arm([50.0, 50.0]), "msm": arm([30.0, 30.0], 10)}}
    ablate.save_picture(tmp_path / "bars.png", results, ["vqa"])
    png = np.asarray(Image.open(tmp_path / "bars.png").convert("RGB")).astype(int)
    black = (png == 0).all(-1)
    col = int(black.sum(0).argmax())  # the y axis: the column with the most black
    rows = np.nonzero(black[:, col])[0]
    top, bottom = rows.min(), rows.max()
    right = np.nonzero(black[bottom])[0].max()
    slot = (right - col) / 2
    for i, (mean, colour) in enumerate(((50, plots.COLOURS[0]), (30, plots.COLOURS[1]))):
        x = round(col + (i + 0.5) * slot + 0.2 * slot)  # beside the error bar and the seeds' dots
        ours = (np.abs(png[:, x] - [int(colour[k:k + 2], 16) for k in (1, 3, 5)]).sum(-1) < 10).nonzero()[0]
        assert abs(ours.min() - (bottom - mean / 60 * (bottom - top))) <= 1.5 and ours.max() >= bottom - 1
    (tmp_path / "results.json").write_text(json.dumps({"config": {"tasks": "vqa"}, "results": results}))
    ablate.main(["--picture-from", str(tmp_path / "results.json"), "--out-dir", str(tmp_path / "again")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again" / "results.png").convert("RGB")), png)
