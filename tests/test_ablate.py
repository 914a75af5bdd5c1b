"""ablate.py's summary: means, sample spreads and the verdict on each claim, against hand-made results."""
import ablate


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
