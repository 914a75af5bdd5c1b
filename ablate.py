"""The paper's tables in miniature, on the shapes world: pre-train, fine-tune, score, over seeds.

Table "objectives" (EVE Table 5 in spirit): no pre-training vs MSM vs ITC+ITM, each pre-trained for
the SAME wall-clock budget, then fine-tuned identically on VQA, NLVR2 and retrieval.
Table "architecture": MSM pre-training with the modality-aware MoE vs the MoE without modality routing
vs multiway FFNs only vs dense FFNs, then the same fine-tuning.

    python ablate.py                                   # both tables, seeds 0 and 1 (46 minutes on 2 CPU cores)
    python ablate.py --table objectives --seeds 0,1,2  # one table, three seeds
    python ablate.py --pretrain-seconds 600 --finetune-scale 4   # a longer, less noisy version

Each run is its own process (pretrain.py / finetune.py with flags), so the numbers are the ones the README's
commands give. An equal wall-clock budget is turned into a number of steps per objective by timing a few
steps of each first (the LR schedule then runs to its end). Results: runs/ablate/results.json and
results.md (mean, sample standard deviation and every seed's value).
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import inference
import training

ROOT = Path(__file__).resolve().parent
TASKS = {name: task.metric for name, task in inference.TASKS.items()}  # each fine-tuning task's test metric
# arm name -> (pre-training objective or None, model flags)
TABLES = {
    "objectives": {"scratch": (None, []), "msm": ("msm", []), "itc_itm": ("itc_itm", [])},
    "architecture": {"moe, modality-aware": ("msm", []), "moe, no modality routing": ("msm", ["--no-modality-routing"]),
                     "multiway only": ("msm", ["--top-ffn", "multiway"]),
                     "dense": ("msm", ["--ffn", "dense", "--top-ffn", "dense"])},
}


@dataclass
class AblateConfig:
    table: str = "all"  # objectives | architecture | all
    seeds: str = "0,1"  # comma-separated seeds; every arm runs once per seed
    pretrain_seconds: float = 60.0  # wall-clock budget of each pre-training run (same for every objective)
    finetune_scale: float = 1.0  # multiplies the fine-tuning steps below (more = less noise, more time)
    vqa_steps: int = 50  # VQA fine-tuning steps
    nlvr2_steps: int = 40  # NLVR2 fine-tuning steps
    retrieval_steps: int = 30  # retrieval fine-tuning steps
    batch_size: int = 64  # pre-training batch
    finetune_batch_size: int = 32  # fine-tuning batch
    k_test: int = 0  # retrieval: ITM re-ranking depth; 0 = rank by ITC alone (re-ranking would double the run)
    data_dir: str = "data/shapes"  # the shapes world (generated when absent)
    out_dir: str = "runs/ablate"  # every run's folder, results.json and results.md


def run(script, *flags):
    """One pretrain.py / finetune.py process; a failure stops the ablation with its error."""
    cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def steps_for_budget(ac, objective, flags, seconds, work):
    """Optimizer steps that fit in `seconds`: time a few steps of this objective first."""
    probe = work / f"probe_{objective}"
    run("pretrain.py", "--objective", objective, "--max-steps", 8, "--log-every", 1, "--save-every", 1000,
        "--picture-every", 1000, "--batch-size", ac.batch_size, "--data-dir", ac.data_dir, "--out-dir", probe, *flags)
    rows = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["samples_per_s"] for r in rows[3:])  # the first steps include warm-up
    return max(1, int(seconds * rate / ac.batch_size))


def run_arm(ac, objective, flags, seed, work, steps):
    """Pre-train (unless scratch) then fine-tune and test each task; returns {task: test metric}."""
    init = []
    t0 = time.time()
    if objective:
        run("pretrain.py", "--objective", objective, "--max-steps", steps, "--seed", seed, "--batch-size", ac.batch_size,
            "--warmup-steps", max(1, steps // 10), "--data-dir", ac.data_dir, "--out-dir", work / "pretrain",
            "--save-every", steps, "--picture-every", steps, *flags)
        init = ["--init", work / "pretrain" / "last.pt"]
    pretrain_s = time.time() - t0
    scores = {}
    for task, metric in TASKS.items():
        task_steps = max(1, round(getattr(ac, f"{task}_steps") * ac.finetune_scale))
        out = work / f"finetune_{task}"
        run("finetune.py", "--task", task, "--max-steps", task_steps, "--seed", seed,
            "--batch-size", ac.finetune_batch_size, "--k-test", ac.k_test, "--data-dir", ac.data_dir,
            "--out-dir", out, *init, *(flags if not init else []))
        scores[task] = json.loads((out / "results.json").read_text())["test"][metric]
    return scores, pretrain_s


def summarise(results):
    """Markdown: one row per arm, mean ± sample std over seeds, then the seeds' values."""
    lines = []
    for table, arms in results.items():
        lines += [f"### {table}", "", "| arm | pre-training steps | " + " | ".join(f"{t} ({m})" for t, m in TASKS.items()) + " |",
                  "|---|---|" + "---|" * len(TASKS)]
        for arm, runs in arms.items():
            cells = []
            for task in TASKS:
                values = [r["scores"][task] for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f} ({', '.join(f'{v:.1f}' for v in values)})")
            steps = runs[0]["pretrain_steps"] or "-"
            lines.append(f"| {arm} | {steps} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_dataclass_args(parser, AblateConfig)
    ac = AblateConfig(**training.pick_fields(parser.parse_args(argv), AblateConfig))
    tables = list(TABLES) if ac.table == "all" else [ac.table]
    if any(t not in TABLES for t in tables):
        raise SystemExit(f"error: --table must be all or one of {sorted(TABLES)}")
    seeds = [int(s) for s in ac.seeds.split(",")]
    out_dir = Path(ac.out_dir)
    t0 = time.time()
    # the MSM arm with the default architecture is the same run in both tables: run it once
    arms = {(objective, tuple(flags)) for t in tables for objective, flags in TABLES[t].values()}
    steps = {arm: steps_for_budget(ac, arm[0], list(arm[1]), ac.pretrain_seconds, out_dir) if arm[0] else 0
             for arm in sorted(arms, key=str)}
    done = {}
    for seed in seeds:
        for arm in sorted(arms, key=str):
            work = out_dir / f"{arm[0] or 'scratch'}{''.join(arm[1]).replace('--', '_')}" / f"seed{seed}"
            print(f"[{time.time() - t0:5.0f}s] seed {seed}: {arm[0] or 'scratch'} {' '.join(arm[1])} "
                  f"({steps[arm]} pre-training steps)", flush=True)
            scores, seconds = run_arm(ac, arm[0], list(arm[1]), seed, work, steps[arm])
            done[arm, seed] = dict(seed=seed, scores=scores, pretrain_steps=steps[arm], pretrain_seconds=round(seconds))
    results = {t: {name: [done[(objective, tuple(flags)), s] for s in seeds] for name, (objective, flags) in TABLES[t].items()}
               for t in tables}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(dict(config=ac.__dict__, results=results,
                                                          wall_seconds=round(time.time() - t0)), indent=1))
    table = summarise(results)
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"{time.time() - t0:.0f}s in all; {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
