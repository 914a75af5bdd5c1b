"""The paper's claims in miniature, on the shapes world: pre-train for equal wall clock, fine-tune, score, over seeds.

Tables (each arm pre-trains with pretrain.py for the SAME wall-clock budget, --max-seconds inside pretrain.py,
alone on the machine; then every arm is fine-tuned once per seed with the same finetune.py flags, --jobs runs
at a time, and scored on test with the official metrics):
  objectives    no pre-training vs MSM vs ITC+ITM (EVE's Table 5 in spirit)
  routing       MSM with the modality-aware MoE vs the same MoE whose router is not told the modality
  architecture  the MoE vs multiway FFNs only vs dense FFNs (all MSM)
  claims        objectives + routing (the default): MSM > scratch, MSM >= ITC+ITM, modality-aware >= plain routing

    python ablate.py                                   # the claims, 3 fine-tuning seeds (docs/RESULTS.md: its time)
    python ablate.py --pretrain-per-seed               # every seed pre-trains anew too (3x the pre-training time)
    python ablate.py --table all --seeds 0,1           # every table
    python ablate.py --pretrain-seconds 600 --vqa-steps 1000 --train-fraction 1 --tasks vqa,nlvr2,retrieval   # all labels
    python ablate.py --table defaults --pretrain-seconds 0 --vqa-steps 0 --nlvr2-steps 0 --retrieval-steps 0 \
        --train-fraction 1 --tasks vqa,nlvr2,retrieval --k-test -1 --pretrain-per-seed   # the README's default commands

Each run is its own process (pretrain.py / finetune.py with flags), so the numbers are the ones the README's
commands give. Results: runs/ablate/results.json and results.md: per arm the mean, sample standard deviation
and every seed's value, the pre-training steps and seconds each arm really took, and one line per claim
saying whether it holds by more than the spread of the seeds; results.png draws them as bars with the seeds'
spread. The bar chart of an earlier run: python ablate.py --picture-from runs/ablate/results.json --out-dir pics
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import evaluate
import plots
import training
from plots import mean_sd
from training import option

ROOT = Path(__file__).resolve().parent
# arm name -> (pre-training objective or None, model flags)
TABLES = {
    "objectives": {"scratch": (None, []), "msm": ("msm", []), "itc_itm": ("itc_itm", [])},
    "routing": {"msm, modality-aware routing": ("msm", []), "msm, no modality routing": ("msm", ["--no-modality-routing"])},
    "architecture": {"msm, moe": ("msm", []), "msm, multiway only": ("msm", ["--top-ffn", "multiway"]),
                     "msm, dense": ("msm", ["--ffn", "dense", "--top-ffn", "dense"])},
}
TABLES["claims"] = {**TABLES["objectives"], "msm, no modality routing": TABLES["routing"]["msm, no modality routing"]}
TABLES["defaults"] = {"scratch": (None, []), "msm": ("msm", [])}  # the README's commands, with 0 budgets and steps below
# the paper's claims: (arm, other arm, strictly better?) as named in the tables; a claim holds when the difference
# of the means is above (strict) or not below (not strict) minus the larger sample standard deviation of the two
CLAIMS = {"MSM pre-training > no pre-training": ("msm", "scratch", True),
          "MSM >= ITC+ITM at equal wall clock": ("msm", "itc_itm", False),
          "modality-aware routing >= no modality routing": ("msm", "msm, no modality routing", False)}


@dataclass
class AblateConfig:
    table: str = option("claims", "claims | objectives | routing | architecture | defaults | all")
    seeds: str = option("0,1,2", "comma-separated seeds; every arm is fine-tuned once per seed")
    pretrain_per_seed: bool = option(False, "pre-train each arm once per seed (else once, with the first seed, and "
                                            "every fine-tuning seed starts from that checkpoint)")
    jobs: int = option(2, "fine-tuning runs at once, each with cores / jobs threads (pre-training runs alone)")
    pretrain_seconds: float = option(180.0, "wall-clock budget of each pre-training run, the same for every "
                                            "objective; 0 = pretrain.py's own steps and batch")
    tasks: str = option("vqa", "fine-tuning tasks, comma-separated: vqa, nlvr2, retrieval")
    vqa_steps: int = option(200, "VQA fine-tuning steps (0 = finetune.py's default, as for the other two)")
    nlvr2_steps: int = option(100, "NLVR2 fine-tuning steps")
    retrieval_steps: int = option(60, "retrieval fine-tuning steps")
    train_fraction: float = option(0.1, "share of each task's training rows used: a low-label setting, where "
                                        "pre-training matters most (1 = all)")
    batch_size: int = option(64, "pre-training batch of every arm under a budget (ITC+ITM's in-batch negatives)")
    finetune_batch_size: int = option(32, "fine-tuning batch")
    k_test: int = option(0, "retrieval: ITM re-ranking depth; 0 = rank by ITC alone; -1 = finetune.py's")
    data_dir: str = option("data/shapes", "the shapes world (generated when absent)")
    out_dir: str = option("runs/ablate", "every run's folder, results.json, results.md and results.png")
    picture_from: str = option("", "only draw the bar chart of an earlier results.json (e.g. assets/ablate_claims.json) "
                                   "as results.png in --out-dir")


def run(script, *flags, threads=0):
    """One pretrain.py / finetune.py process (with `threads` CPU threads, 0 = torch's default); a failure stops
    the ablation with its error."""
    cmd = [sys.executable, str(ROOT / script), *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def log_rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def schedule_steps(ac, objective, flags, work):
    """How many steps the LR schedule should span: the steps that fit in the budget at this objective's speed,
    timed over 8 steps, plus a quarter. The budget itself is exact (pretrain.py --max-seconds); this only
    shapes the warm-up and the cosine, so that every objective's LR has decayed about as far when time is up."""
    probe = work / f"probe_{objective}{''.join(flags).replace('--', '_')}"
    run("pretrain.py", "--objective", objective, "--max-steps", 8, "--log-every", 1, "--save-every", 1000,
        "--picture-every", 1000, "--batch-size", ac.batch_size, "--data-dir", ac.data_dir, "--out-dir", probe, *flags)
    rate = statistics.median(r["samples_per_s"] for r in log_rows(probe)[3:] if "samples_per_s" in r)  # past warm-up
    return max(10, math.ceil(1.25 * ac.pretrain_seconds * rate / ac.batch_size))


def pretrain_arm(ac, objective, flags, seed, work, steps):
    """Pre-train one arm for the budget, alone on the machine (the budget is wall clock).
    Returns (checkpoint, steps done, seconds measured by pretrain.py)."""
    budget = ["--max-steps", steps, "--max-seconds", ac.pretrain_seconds, "--warmup-steps", max(1, steps // 10),
              "--save-every", steps, "--picture-every", steps, "--batch-size", ac.batch_size] if ac.pretrain_seconds else []
    run("pretrain.py", "--objective", objective, "--seed", seed, "--data-dir", ac.data_dir, "--out-dir", work,
        *budget, *flags)
    last = [r for r in log_rows(work) if "seconds" in r][-1]  # steps done and seconds trained
    return work / "last.pt", last["step"], last["seconds"]


def finetune_score(ac, task, seed, init, flags, out, threads):
    """Fine-tune one task (from init, or from scratch with the arm's model flags) and return its test metric."""
    steps = getattr(ac, f"{task}_steps")
    budget = ["--max-steps", steps, "--eval-every", steps] if steps else []  # val once, at the end: best.pt = last
    run("finetune.py", "--task", task, *budget, "--seed", seed,
        "--batch-size", ac.finetune_batch_size, *(["--k-test", ac.k_test] if ac.k_test >= 0 else []),
        "--train-fraction", ac.train_fraction, *(["--num-workers", 1] if ac.jobs > 1 else []),
        "--data-dir", ac.data_dir, "--out-dir", out, *(["--init", init] if init else flags), threads=threads)
    return json.loads((out / "results.json").read_text())["test"][evaluate.TASKS[task].metric]


def summarise(results, tasks):
    """Markdown: one row per arm, mean ± sample std over seeds and the seeds' values; then the claims."""
    lines = []
    for table, arms in results.items():
        lines += [f"### {table}", "", "| arm | pre-training steps (seconds) | " +
                  " | ".join(f"{t} ({evaluate.TASKS[t].metric})" for t in tasks) + " |", "|---|---|" + "---|" * len(tasks)]
        for arm, runs in arms.items():
            cells = []
            for task in tasks:
                values = [r["scores"][task] for r in runs]
                m, sd = mean_sd(values)
                cells.append(f"{m:.1f} ± {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)})")
            steps = ", ".join(f"{r['pretrain_steps']} ({r['pretrain_seconds']:.0f})" for r in runs) if runs[0]["pretrain_steps"] else "-"
            lines.append(f"| {arm} | {steps} | " + " | ".join(cells) + " |")
        lines.append("")
    verdicts = claim_verdicts(results, tasks)
    lines += ["### claims", ""] if verdicts else []
    return "\n".join(lines + [f"- {line}" for line in verdicts]) + "\n"


def claim_verdicts(results, tasks):
    """One line per claim whose two arms were run (and task): the two means, their difference, the larger sample
    standard deviation of the two, and whether the claim holds by more than that spread."""
    arms = {arm: runs for table in results.values() for arm, runs in table.items()}
    out = []
    for name, (a, b, strict) in CLAIMS.items():
        for task in tasks if a in arms and b in arms else ():
            (ma, sa), (mb, sb) = (mean_sd([r["scores"][task] for r in arms[x]]) for x in (a, b))
            diff, spread = ma - mb, max(sa, sb)
            if diff > spread:
                verdict = "holds"
            elif diff >= -spread:
                verdict = "does not hold: equal within the seeds' spread" if strict else "holds (equal within the seeds' spread)"
            else:
                verdict = "does not hold: reversed"
            out.append(f"{name}, {task}: {ma:.1f} vs {mb:.1f}, difference {diff:+.1f} (larger seed spread "
                       f"{spread:.1f}): {verdict}")
    return out


def save_picture(path, results, tasks):
    """A bar chart per table and task: each arm's mean test score over the seeds, the sample standard deviation
    as an error bar and every seed as a dot; the claims' verdicts below."""
    names = list(dict.fromkeys(arm for table in results.values() for arm in table))
    colour = {arm: plots.COLOURS[i % len(plots.COLOURS)] for i, arm in enumerate(names)}
    panels = [plots.Panel(f"{table} table: {task} on test ({evaluate.TASKS[task].metric})",
                          bars=[plots.Bar(arm, colour[arm], [r["scores"][task] for r in runs]) for arm, runs in arms.items()])
              for table, arms in results.items() for task in tasks]
    seeds = ", ".join(map(str, sorted({r["seed"] for arms in results.values() for runs in arms.values() for r in runs})))
    notes = [f"bars: the mean over seeds {seeds}; black: ± the sample standard deviation; circles: each seed"]
    notes += claim_verdicts(results, tasks)
    plots.save_chart(path, panels, notes=notes, cols=1, size=(120 + 130 * max(len(p.bars) for p in panels), 300))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_flags(parser, "options", dataclasses.fields(AblateConfig))
    ac = AblateConfig(**vars(parser.parse_args(argv)))
    if ac.picture_from:
        try:
            earlier = json.loads(Path(ac.picture_from).read_text())
            results, tasks = earlier["results"], earlier["config"]["tasks"].split(",")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {ac.picture_from}: not an ablate.py results.json ({e!r})") from None
        Path(ac.out_dir).mkdir(parents=True, exist_ok=True)
        save_picture(Path(ac.out_dir) / "results.png", results, tasks)
        print(f"the bar chart of {ac.picture_from}: {Path(ac.out_dir) / 'results.png'}")
        return
    tables = [t for t in TABLES if t != "claims"] if ac.table == "all" else [ac.table]
    if any(t not in TABLES for t in tables):
        raise SystemExit(f"error: --table must be all or one of {sorted(TABLES)}")
    tasks = ac.tasks.split(",")
    if any(t not in evaluate.TASKS for t in tasks):
        raise SystemExit(f"error: --tasks must be a comma-separated subset of {sorted(evaluate.TASKS)}")
    seeds = [int(s) for s in ac.seeds.split(",")]
    out_dir = Path(ac.out_dir)
    t0 = time.time()
    say = lambda text: print(f"[{time.time() - t0:5.0f}s] {text}", flush=True)  # noqa: E731
    # an arm that appears in several tables (MSM with the default model) is run once
    arms = {(objective, tuple(flags)) for t in tables for objective, flags in TABLES[t].values()}
    arms = sorted(arms, key=lambda arm: (arm[0] or "", arm[1]))
    folder = {arm: out_dir / f"{arm[0] or 'scratch'}{''.join(arm[1]).replace('--', '_')}" for arm in arms}
    steps = {arm: schedule_steps(ac, arm[0], list(arm[1]), out_dir) if arm[0] and ac.pretrain_seconds else 0
             for arm in arms}
    pretrain_seed = {seed: seed if ac.pretrain_per_seed else seeds[0] for seed in seeds}
    pretrained = {}  # (arm, pre-training seed) -> (checkpoint, steps, seconds); one run at a time: the budget is wall clock
    for seed in sorted(set(pretrain_seed.values())):
        for arm in (arm for arm in arms if arm[0]):
            say(f"pre-train {arm[0]} {' '.join(arm[1])} seed {seed}")
            pretrained[arm, seed] = pretrain_arm(ac, arm[0], list(arm[1]), seed, folder[arm] / f"seed{seed}" / "pretrain",
                                                 steps[arm])
    start = lambda arm, seed: pretrained.get((arm, pretrain_seed[seed]), (None, 0, 0.0))  # noqa: E731 (none: scratch)
    # fine-tuning is measured in steps, not seconds: ac.jobs runs at once, the cores shared out between them
    threads = max(1, (os.cpu_count() or 1) // ac.jobs)
    with ThreadPoolExecutor(ac.jobs) as pool:
        futures = {pool.submit(finetune_score, ac, task, seed, start(arm, seed)[0],
                               list(arm[1]), folder[arm] / f"seed{seed}" / f"finetune_{task}", threads): (arm, seed, task)
                   for seed in seeds for arm in arms for task in tasks}
        scores = {}
        for future in as_completed(futures):
            if future.exception():  # a failed run stops the ablation: the runs not started yet are dropped
                pool.shutdown(cancel_futures=True)
            arm, seed, task = futures[future]
            scores[arm, seed, task] = future.result()
            say(f"fine-tuned {arm[0] or 'scratch'} {' '.join(arm[1])} seed {seed}: {task} {scores[arm, seed, task]:.1f}")
    done = {(arm, seed): dict(seed=seed, scores={task: scores[arm, seed, task] for task in tasks},
                              pretrain_steps=start(arm, seed)[1], pretrain_seconds=start(arm, seed)[2])
            for arm in arms for seed in seeds}
    results = {t: {name: [done[(objective, tuple(flags)), s] for s in seeds] for name, (objective, flags) in TABLES[t].items()}
               for t in tables}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(dict(config=asdict(ac), results=results,
                                                          wall_seconds=round(time.time() - t0)), indent=1))
    table = summarise(results, tasks)
    if not ac.pretrain_per_seed and len(seeds) > 1:
        table = (f"Each arm pre-trained once (seed {seeds[0]}); the seeds vary fine-tuning only, so the spreads are "
                 "fine-tuning's (--pretrain-per-seed pre-trains per seed).\n\n" + table)
    (out_dir / "results.md").write_text(table)
    save_picture(out_dir / "results.png", results, tasks)
    print(table)
    print(f"{time.time() - t0:.0f}s in all; {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
