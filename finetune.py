"""Fine-tune EVE on VQA, NLVR2 or image-text retrieval: evaluate on val after every epoch, keep the best
checkpoint, and score it on test at the end.

CPU, from scratch on the built-in shapes world (generated on first use; at most 5 minutes each on 2 cores with
the shapes table of RECIPES; docs/RESULTS.md has what they reach):
    python finetune.py --task vqa          # or --task nlvr2, --task retrieval
From a pre-trained checkpoint (the architecture and the vocabulary come from the checkpoint):
    python pretrain.py && python finetune.py --task vqa --init runs/pretrain/last.pt
The head alone on the frozen encoder of a checkpoint (a probe of its representation):
    python finetune.py --task nlvr2 --init runs/pretrain/last.pt --freeze-backbone --lr 1e-3
One GPU, your own data in the ALBEF/X-VLM JSON formats, 64 questions per step in micro-batches of 16:
    python finetune.py --task vqa --init base.pt --train-json vqa_train.json --val-json vqa_val.json \\
        --test-json vqa_test.json --image-root /data/coco --epochs 8 --batch-size 64 --micro-batch 16 --lr 2e-5
Several GPUs (one node), or CPU processes with Gloo: the same steps, a micro-batch of 16 on each of 4 GPUs:
    torchrun --standalone --nproc_per_node=4 finetune.py --task vqa --init base.pt ... --batch-size 64 --micro-batch 16
--batch-size is the global batch (all processes together), as in pretrain.py: with the same --batch-size and
--micro-batch, VQA (tests/test_global_batch.py) and NLVR2 end with the same parameters on any number of
processes, to float rounding; retrieval's contrastive negatives change with it (pretrain.py's docstring says why).
Resume: --resume auto (last.pt of --out-dir). Score a result again: python evaluate.py --task vqa
--checkpoint runs/finetune_vqa/best.pt --split test.

Written to --out-dir (runs/finetune_<task>): metrics.jsonl (training, val after every epoch, test),
best.pt (the best val score), last.pt (for resuming), results.json, <task>_<split>_predictions.json.
Evaluation runs on rank 0 only, while the other ranks wait at a barrier.
"""
import argparse
import dataclasses
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import augment
import checkpoints
import data
import evaluate
import metrics
import official
import resilience
import training
from heads import EVEWithHeads, resize_image_pos
from model import EVEConfig, is_official, make_config
from shapes import shapes_world
from tokenization import load_tokenizer, tokenizer_from_state
from training import option


@dataclass
class FinetuneConfig(training.TrainingConfig):
    """finetune.py's options: the shared ones (training.TrainingConfig), its own, and its defaults."""
    task: str = option("vqa", "vqa | nlvr2 | retrieval")
    init: str = option("", "checkpoint to start from (pretrain.py's last.pt, or a released EVE one); empty = scratch")
    val_json: str = option("", "your own val JSON (with --train-json and --test-json): picks best.pt")
    test_json: str = option("", "your own test JSON, scored once with best.pt at the end")
    answer_list: str = option("", "VQA: the answer list JSON of --answer-vocab list (default: the shapes world's)")
    answer_vocab: str = option("counts", "VQA classes: counts (majority answers of >= --min-answer-count questions) "
                                         "| list (--answer-list)")
    min_answer_count: int = option(9, "VQA: the threshold of --answer-vocab counts")
    out_dir: str = option("", "checkpoints, metrics.jsonl, results.json (default: runs/finetune_<task>)")
    epochs: float = option(1.0, "passes over the training data")
    max_steps: int = option(0, "optimizer steps; 0 = epochs x steps per epoch")
    train_fraction: float = option(1.0, "train on this share of the rows (the same rows for every seed)")
    head_lr_mult: float = option(1.0, "the task's new head learns at head_lr_mult x lr")
    warmup_steps: int = option(-1, "linear warm-up steps; -1 = warmup_ratio of all steps")
    warmup_ratio: float = 0.1  # the warm-up's share of all steps when warmup_steps is -1
    recipe: str = option("auto", "the task's table of defaults (RECIPES): shapes | official | none; auto = official "
                                 "for the official architecture, shapes on the shapes world, else none")
    augment: str = option("none", "training images: none | flip | color | randaug (augment.augment_draws)")
    k_test: int = option(16, "retrieval: ITM re-ranks each query's top k_test ITC candidates; 0 = ITC only")
    rank: str = option("itc+itm", "retrieval: rank the candidates by itc | itm | itc+itm")
    objective: str = option("", "what to train: empty = the task's; retrieval also takes itc (then --rank itc)")
    freeze_backbone: bool = option(False, "train the task's head only, on the frozen encoder: a probe of --init")
    nlvr2_head: str = option("mlp", "NLVR2 head: mlp (on both text [CLS]) | biattn (official --biattn)")
    eval_every: int = option(0, "steps between val evaluations; 0 = after every epoch (the last step always)")
    save_every: int = option(0, "steps between resume checkpoints; 0 = at the end of every epoch")
    keep_last: int = 2  # resume checkpoints kept


# the model fields a fine-tuning run may set over the preset or the --init checkpoint, with their help
MODEL_FLAGS = {"image_size": "fine-tuning resolution (position tables are resized)",
               "drop_path": "stochastic depth rate of the last layer", "itc_temp": "initial ITC temperature"}
TASKS = tuple(evaluate.TASKS)
# Each task's table of defaults, chosen by --recipe; a flag given wins, and model fields in it (itc_temp,
# image_size) are set like flags, also over an --init checkpoint's.
#   shapes: the built-in shapes world with the tiny preset, sized for 5 minutes on 2 CPU cores (docs/RESULTS.md).
#     Retrieval trains the contrastive loss alone and ranks by it (2 encoder passes a step instead of ITC+ITM's 5);
#     its seeds were erratic at VQA's lr, and a pre-trained model barely moves from the tiny preset's temperature.
#   official: the official EVE fine-tuning (github ssyze/EVE: configs/VQA_beit_480_vg.yaml, NLVR_vit_lrtest_5e-5.yaml,
#     Retrieval_*_ft.yaml, optim.py, scheduler.py): AdamW betas (0.9, 0.98), decay 0.01 and to 0 after the warm-up,
#     10 epochs, the new head's lr_mult, grad clip, resolution and augmentation. Its batch sizes are left to
#     --batch-size; its flips keep the text, here a flip swaps left and right in the text (docs/OFFICIAL.md).
OFFICIAL_COMMON = dict(weight_decay=0.01, adam_beta2=0.98, min_lr_ratio=0.0, epochs=10.0)
RECIPES = {
    "shapes": {"vqa": dict(epochs=1.0), "nlvr2": dict(epochs=4.0),
               "retrieval": dict(epochs=0.64, objective="itc", rank="itc", lr=2e-4, itc_temp=0.1)},
    "official": {"vqa": dict(OFFICIAL_COMMON, lr=3e-5, head_lr_mult=10.0, schedule="linear", warmup_ratio=0.1,
                             grad_clip=3.0, image_size=480, augment="randaug"),
                 "nlvr2": dict(OFFICIAL_COMMON, lr=5e-5, head_lr_mult=2.0, schedule="cosine", warmup_ratio=0.2,
                               grad_clip=3.0, image_size=384, augment="flip"),
                 "retrieval": dict(OFFICIAL_COMMON, lr=3e-5, head_lr_mult=2.0, schedule="linear", warmup_ratio=0.1,
                                   grad_clip=1.0, image_size=384, augment="flip")},
    "none": {task: {} for task in TASKS},
}


# ---- VQA answers -------------------------------------------------------------------------

def vqa_targets(answer_lists, answer_index):
    """Soft targets [B, num_answers] for the binary cross-entropy of heads.EVEWithHeads.loss_vqa."""
    targets = torch.zeros(len(answer_lists), len(answer_index))
    for b, answers in enumerate(answer_lists):
        for k, score in metrics.soft_scores(answers, answer_index)[0].items():
            targets[b, k] = score
    return targets


def vqa_answers(fc, rows, verbose=True):
    """The answer classes (from counts or from --answer-list), with a report of what they leave out."""
    if fc.answer_vocab == "list":
        try:
            listed = json.loads(Path(fc.answer_list).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: --answer-list {fc.answer_list}: cannot read it ({e})") from None
        if not isinstance(listed, list) or not all(isinstance(a, str) for a in listed):
            raise SystemExit(f"error: --answer-list {fc.answer_list}: expected a JSON list of answer strings")
        answers = list(dict.fromkeys(metrics.normalize_vqa_answer(a) for a in listed))  # normalised, deduplicated
    elif fc.answer_vocab == "counts":
        answers = metrics.answer_vocabulary(rows, fc.min_answer_count)
    else:
        raise SystemExit(f"error: --answer-vocab must be counts or list, not {fc.answer_vocab!r}")
    if not answers:
        raise SystemExit(f"error: the answer vocabulary is empty (--answer-vocab {fc.answer_vocab}: no answer is the "
                         f"majority answer of {fc.min_answer_count} training questions, or an empty --answer-list)")
    index = {a: i for i, a in enumerate(answers)}
    per_row = [metrics.soft_scores(metrics.human_answers(r), index) for r in rows]
    n_humans = sum(len(metrics.human_answers(r)) for r in rows)
    ignored, no_target = sum(n for _, n in per_row), sum(not s for s, _ in per_row)
    if verbose:
        print(f"answer vocabulary: {len(answers)} answers ({fc.answer_vocab}); {ignored} of {n_humans} human answers "
              f"({100 * ignored / max(1, n_humans):.1f}%) are outside it and ignored; {no_target} questions have no target")
    return answers


# ---- set-up: the options in one order (the preset or checkpoint, the task's table, the command line) ----------

def recipe_of(fc, cfg):
    """The name of the task's table that --recipe chooses for this model config."""
    if fc.recipe not in ("auto", *RECIPES):
        raise SystemExit(f"error: --recipe must be auto, {', '.join(RECIPES)}, not {fc.recipe!r}")
    if fc.recipe != "auto":
        return fc.recipe
    return "official" if is_official(cfg) else "none" if fc.train_json else "shapes"


def settle(given, cfg, fresh=True):
    """(FinetuneConfig, model overrides): the task's table under the flags `given` (vars of parse_args), for a
    model whose config so far is cfg (the preset's or the checkpoint's). fresh=False (a resumed run): the
    model is the checkpoint's as it is."""
    own_flags, model_flags = training.split_given(given, FinetuneConfig)
    fc = FinetuneConfig(**own_flags)
    own_table, model_table = training.split_given(RECIPES[recipe_of(fc, cfg)][fc.task], FinetuneConfig)
    return FinetuneConfig(**{**own_table, **own_flags}), ({**model_table, **model_flags} if fresh else {})


def data_paths(fc, rank, world):
    """The data paths of a run, to replace into fc: own files, or the shapes world's for the task."""
    own = [fc.train_json, fc.val_json, fc.test_json]
    if any(own) and not all(own):
        raise SystemExit("error: own data needs all of --train-json, --val-json and --test-json")
    out = {"out_dir": fc.out_dir or f"runs/finetune_{fc.task}"}
    if all(own):
        out["image_root"] = fc.image_root or str(Path(fc.train_json).parent)
    else:
        paths = {k: str(v) for k, v in shapes_world(fc.data_dir, rank, world).items()}
        out.update({f"{s}_json": paths[f"{fc.task}_{s}"] for s in ("train", "val", "test")},
                   image_root=fc.image_root or paths["root"], answer_list=fc.answer_list or paths["answer_list"],
                   vocab=fc.vocab or (paths["vocab"] if not fc.init and not fc.bpe else ""))
    return out


def base_model(fc):
    """(EVEConfig before the task's table, tokenizer, --init checkpoint or None, the NLVR2 head it has or None)."""
    try:
        tokenizer = load_tokenizer(fc.vocab, fc.bpe) if fc.vocab or fc.bpe else None
    except ValueError as e:  # a missing or malformed file: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    if not fc.init:
        if tokenizer is None:
            raise SystemExit("error: own data from scratch needs --vocab (a vocab.txt) or --bpe (vocab.json + merges.txt)")
        return make_config(fc.preset, vocab_size=len(tokenizer), pad_id=tokenizer.pad_id), tokenizer, None, None
    if not Path(fc.init).is_file():
        raise SystemExit(f"error: --init {fc.init}: no such checkpoint file")
    ckpt = checkpoints.load_checkpoint(fc.init)
    released = official.state_dict_of(ckpt)
    if released is not None:  # a released EVE checkpoint: the architecture from its shapes, names mapped in load_init
        if tokenizer is None:
            raise SystemExit(f"error: --init {fc.init} is an official EVE checkpoint, which carries no vocabulary: "
                             "give its tokenizer with --bpe DIR (vocab.json + merges.txt)")
        cfg = official.official_config(released, pad_id=tokenizer.pad_id)
        if len(tokenizer) > cfg.vocab_size:
            raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens, {fc.init} embeds {cfg.vocab_size}")
        return cfg, tokenizer, {"official": released}, official.official_nlvr2_head(released)
    if not all(k in ckpt for k in ("model", "config", "vocab")):
        raise SystemExit(f"error: --init {fc.init}: not a pretrain.py checkpoint (needs model, config and vocab)")
    own = tokenizer_from_state(ckpt["vocab"])  # the vocabulary travels in the checkpoint
    if tokenizer is not None and tokenizer.state != own.state:
        raise SystemExit(f"error: --{'bpe' if fc.bpe else 'vocab'} {fc.bpe or fc.vocab} differs from the vocabulary of {fc.init}")
    return checkpoints.model_config(ckpt, fc.init, EVEConfig), own, ckpt, None


POS_TABLES = ("image_pos", "decoder.pos_embed")  # (1, 1 + patches, D): resized when fine-tuning at another resolution


def load_init(model, ckpt, source, verbose=True):
    """The pre-trained weights; the task heads stay new. Shape mismatches stop with a list of the tensors. At
    another resolution than pre-training, the image position tables (encoder and pixel decoder) are resized."""
    if "official" in ckpt:
        state = official.convert(ckpt["official"], model, source, verbose)
    else:
        own = model.state_dict()
        state = {k: resize_image_pos(v, math.isqrt(own[k].shape[1] - 1)) if k in POS_TABLES and k in own else v
                 for k, v in ckpt["model"].items()}
    missing, unexpected = checkpoints.load_model_state(model, state, source, strict=False)
    if not verbose:
        return
    for what, keys in (("new (randomly initialised)", missing), ("in the checkpoint but not used", unexpected)):
        modules = Counter(k.split(".")[0] for k in keys)
        if modules:
            print(f"{what}: " + ", ".join(f"{m} ({n} tensors)" for m, n in sorted(modules.items())))
    print(f"loaded {len(state) - len(unexpected)} tensors from {source}")


def check_choices(fc):
    """Stop with one line on a --rank or --objective this task cannot take. Returns fc."""
    if fc.rank not in evaluate.RANK_MODES:
        raise SystemExit(f"error: --rank must be one of {', '.join(evaluate.RANK_MODES)}, not {fc.rank!r}")
    objectives = {evaluate.TASKS[fc.task].objective} | ({"itc"} if fc.task == "retrieval" else set())
    if fc.objective and fc.objective not in objectives:
        raise SystemExit(f"error: --objective for --task {fc.task} must be one of {sorted(objectives)}, not {fc.objective!r}")
    if fc.objective == "itc" and fc.rank != "itc" and fc.k_test > 0:
        raise SystemExit("error: --objective itc trains no ITM head: rank with --rank itc (or --k-test 0)")
    return fc



# ---- the run -----------------------------------------------------------------------------

def parse_args(argv=None):
    """The flags given (and only those): a Namespace."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_flags(parser, "fine-tuning", dataclasses.fields(FinetuneConfig))
    training.add_flags(parser, "model (defaults: the preset's, or with --init the checkpoint's)",
                       training.model_fields(MODEL_FLAGS), MODEL_FLAGS)
    return parser.parse_args(argv)


def main(argv=None):
    data.use_huge_pages()  # before the first tensor
    given = vars(parse_args(argv))
    rank, world, _, device = training.setup_distributed(given.get("seed", FinetuneConfig.seed))
    try:
        return run(given, rank, world, device)
    except data.DataError as e:  # bad rows or images, in training or evaluation: one clean line
        raise training.data_error_exit(e) from None
    finally:
        training.cleanup_distributed()


def setup(given, rank, world):
    """(fc, cfg, tokenizer, init checkpoint or None, model overrides, resume path, resume checkpoint or None)."""
    if given.get("task", "vqa") not in TASKS:
        raise SystemExit(f"error: --task must be one of {', '.join(TASKS)}, not {given['task']!r}")
    fc = FinetuneConfig(**training.split_given(given, FinetuneConfig)[0])
    paths = data_paths(fc, rank, world)  # no table sets a path: they hold for the settled config too
    fc = replace(fc, **paths)
    resume_path, resume = checkpoints.load_resume(fc.resume, fc.out_dir, verbose=rank == 0)
    if resume:  # the run's model, vocabulary, heads and answers are the checkpoint's
        if resume.get("finetune_config", {}).get("task") != fc.task:
            raise SystemExit(f"error: {resume_path} is not a checkpoint of a --task {fc.task} fine-tuning run")
        cfg, tokenizer, init = checkpoints.model_config(resume, resume_path, EVEConfig), tokenizer_from_state(resume["vocab"]), None
        head = resume["heads"]["nlvr2_head"]
    else:
        cfg, tokenizer, init, head = base_model(fc)
    fc, overrides = settle(given, cfg, fresh=not resume)
    if head and "nlvr2_head" not in given:  # the checkpoint's NLVR2 head, unless one is asked for
        fc = replace(fc, nlvr2_head=head)
    fc = check_choices(replace(fc, **paths))
    if init and overrides and rank == 0:  # e.g. --drop-path; one that changes a tensor shape fails when loading
        print(f"overriding the checkpoint's model config with {overrides}")
    return fc, make_config(cfg, **overrides), tokenizer, init, overrides, resume_path, resume


def run(given, rank, world, device):
    fc, cfg, tokenizer, init, overrides, resume_path, resume = setup(given, rank, world)
    if fc.augment not in augment.AUGMENTS:
        raise SystemExit(f"error: --augment must be one of {', '.join(augment.AUGMENTS)}, not {fc.augment!r}")
    task = evaluate.TASKS[fc.task]
    train_set = task.train_set(fc.train_json, fc.image_root, cfg.image_size, skip_bad=fc.skip_bad,
                               augment=fc.augment, seed=fc.seed)
    if not 0 < fc.train_fraction <= 1:
        raise SystemExit(f"error: --train-fraction must be in (0, 1], not {fc.train_fraction}")
    if fc.train_fraction < 1:  # a fixed subset, whatever the seed, so that seeds vary only the run
        n = len(train_set)
        train_set.subset(sorted(random.Random(0).sample(range(n), max(1, round(fc.train_fraction * n)))))
    answers = None
    if fc.task == "vqa":
        answers = resume["answers"] if resume else vqa_answers(fc, train_set.rows, verbose=rank == 0)
    fc = training.split_batch(fc, world)  # micro_batch and grad_accum from the global --batch-size
    loader = data.make_loader(train_set, fc.micro_batch, data.Collator(tokenizer, cfg.max_text_len), shuffle=True,
                              seed=fc.seed, num_workers=fc.num_workers, drop_last=True, accum=fc.grad_accum,
                              rank=rank, world=world)
    steps_per_epoch = len(loader) // fc.grad_accum  # as fit() counts them
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {fc.train_json} has {len(train_set)} rows, fewer than one step of {fc.batch_size}")
    max_steps = fc.max_steps or max(1, round(fc.epochs * steps_per_epoch))
    fc = replace(fc, max_steps=max_steps, save_every=fc.save_every or steps_per_epoch,
                 warmup_steps=fc.warmup_steps if fc.warmup_steps >= 0 else int(max_steps * fc.warmup_ratio))

    model = EVEWithHeads(cfg, num_answers=len(answers or []), nlvr2_head=fc.nlvr2_head if fc.task == "nlvr2" else "")
    model = model.to(device)
    if init:
        load_init(model, init, fc.init, verbose=rank == 0)
        if "itc_temp" in overrides:  # a given (or the table's) starting temperature wins over the checkpoint's
            with torch.no_grad():
                model.temp.fill_(cfg.itc_temp)
    objective = fc.objective or task.objective
    model.freeze_unused_heads(objective, backbone=fc.freeze_backbone)
    opt, sched = training.make_optimizer(model, fc, heads=model.TASK_HEADS[objective], head_lr_mult=fc.head_lr_mult)
    progress = checkpoints.restore(resume, resume_path, model, opt, sched, rank, world) if resume else {}
    if rank == 0:
        print(cfg)
        print(f"{fc.task}: {len(train_set)} training rows, {steps_per_epoch} steps per epoch of {fc.batch_size} "
              f"({world} process(es) x {fc.grad_accum} micro-batch(es) of {fc.micro_batch}), {max_steps} steps, "
              f"device {device}"
              + (f", resumed from {resume_path} at step {progress['step']}" if resume else ""))
    return train_and_test(fc, model, tokenizer, answers, loader, opt, sched, objective, progress, resume,
                          device, rank, world)


def train_and_test(fc, model, tokenizer, answers, loader, opt, sched, objective, progress, resume, device, rank, world):
    """Train, score val after every epoch (or --eval-every steps) and keep the best in best.pt, then score test
    with it. Returns results.json's dict on rank 0 (None elsewhere, or when stopped early)."""
    steps_per_epoch, key = len(loader) // fc.grad_accum, evaluate.TASKS[fc.task].metric
    out_dir = Path(fc.out_dir)
    best_path = out_dir / "best.pt"
    best = {"metric": -math.inf, "step": 0, "val": None}  # the val score of best.pt
    if resume:  # best.pt may be newer than the resume checkpoint
        best = checkpoints.load_checkpoint(best_path)["best"] if best_path.exists() else resume["best"]
    log = training.MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)

    def state():  # what every checkpoint holds besides the weights and the optimizer
        return dict(config=asdict(model.cfg), heads=model.heads_config(), finetune_config=asdict(fc),
                    vocab=tokenizer.state, answers=answers, best=best)

    def score(split, step):
        predictions = out_dir / f"{fc.task}_{split}_predictions.json" if fc.task != "retrieval" else None
        scores = evaluate.evaluate_split(fc.task, model, tokenizer, getattr(fc, f"{split}_json"), fc.image_root,
                                         device, answers=answers, k_test=fc.k_test, rank=fc.rank,
                                         batch_size=2 * fc.micro_batch, num_workers=fc.num_workers,
                                         skip_bad=fc.skip_bad, predictions_path=predictions)
        log.write(step=step, split=split, **scores)
        return scores

    def after_step(step, batch, out):
        if step % (fc.eval_every or steps_per_epoch) and step != fc.max_steps:
            return
        if rank == 0:  # one process evaluates the whole split; the others wait below
            val = score("val", step)
            print(f"\nval at step {step} (epoch {step / steps_per_epoch:.2f}): {key} {val.get(key, math.nan):.2f}")
            if key not in val or val[key] > best["metric"]:  # no score (VQA val without answers): the latest
                best.update(metric=val.get(key, -math.inf), step=step, val=val)
                checkpoints.atomic_save(dict(model=model.state_dict(), step=step, **state()), best_path)
            model.train()
        if world > 1:
            dist.barrier()

    index = {a: i for i, a in enumerate(answers or [])}
    prepare = (lambda b: {**b, "vqa_targets": vqa_targets(b["answers"], index).to(device)}) if answers else None
    t0 = time.time()
    step = training.fit(model, loader, opt, sched, fc, objective, device, rank, world,
                        resilience.Run(progress, extra_state=state), prepare=prepare, after_step=after_step)
    if rank != 0 or step < fc.max_steps:  # stopped by a signal: no test yet
        return None
    fit_s = time.time() - t0
    checkpoints.load_model_state(model, checkpoints.load_checkpoint(best_path)["model"], best_path)
    test = score("test", step)
    results = {"task": fc.task, "checkpoint": str(best_path), "best_step": best["step"], "val": best["val"],
               "test": test, "fit_seconds": round(fit_s), "test_seconds": round(time.time() - t0 - fit_s)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ntest ({fc.test_json}, best val step {best['step']}):")
    print(metrics.format_table(metrics.metrics_table(fc.task, test)))
    print(f"results: {out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
