"""Fine-tune EVE on VQA, NLVR2 or image-text retrieval: evaluate on val after every epoch, keep the best
checkpoint, and score it on test at the end.

CPU, from scratch on the built-in shapes world (generated on first use; at most 5 minutes each on 2 cores with
the defaults of SHAPES_DEFAULTS; the README has what they reach):
    python finetune.py --task vqa          # or --task nlvr2, --task retrieval
From a pre-trained checkpoint (the architecture and the vocabulary come from the checkpoint):
    python pretrain.py && python finetune.py --task vqa --init runs/pretrain/last.pt
The head alone on the frozen encoder of a checkpoint (a probe of its representation):
    python finetune.py --task nlvr2 --init runs/pretrain/last.pt --freeze-backbone --lr 1e-3
One GPU, your own data in the ALBEF/X-VLM JSON formats:
    python finetune.py --task vqa --init base.pt --train-json vqa_train.json --val-json vqa_val.json \\
        --test-json vqa_test.json --image-root /data/coco --epochs 8 --batch-size 64 --lr 2e-5
Several GPUs (one node), or CPU processes with Gloo:
    torchrun --standalone --nproc_per_node=4 finetune.py --task retrieval --init base.pt ...
Resume: --resume auto (last.pt of --out-dir). Score a result again: python evaluate.py --task vqa
--checkpoint runs/finetune_vqa/best.pt --split test.

Written to --out-dir (runs/finetune_<task>): metrics.jsonl (training, val after every epoch, test),
best.pt (the best val score), last.pt (for resuming), results.json, <task>_<split>_predictions.json.
Evaluation runs on rank 0 only, while the other ranks wait at a barrier.
"""
import argparse
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# Transparent huge pages for CPU tensors of 2 MB or more (0 opts out): see bench.py. Set before the
# imports below, because PyTorch reads it at its first CPU allocation and importing data.py makes one.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import inference  # noqa: E402
import official  # noqa: E402
import training  # noqa: E402
from model import EVE, OFFICIAL, TASK_HEADS, EVEConfig, make_config, resize_image_pos  # noqa: E402
from shapes import shapes_world  # noqa: E402
from tokenization import load_tokenizer, tokenizer_from_state  # noqa: E402


@dataclass
class FinetuneConfig(training.TrainingConfig):
    """finetune.py's options: the shared ones (training.TrainingConfig), its own, and its defaults."""
    task: str = "vqa"  # vqa | nlvr2 | retrieval
    init: str = ""  # pre-trained checkpoint to start from (pretrain.py's last.pt); empty = from scratch
    preset: str = "tiny"  # model preset of a from-scratch run: tiny | small | base | large
    train_json: str = ""  # your own training JSON (then also --val-json and --test-json)
    val_json: str = ""  # evaluated after every epoch; picks best.pt
    test_json: str = ""  # evaluated once, with best.pt, at the end
    image_root: str = ""  # folder the JSON's image paths are relative to (default: the train JSON's folder)
    answer_list: str = ""  # VQA answer list JSON, used with --answer-vocab list (default: the shapes world's)
    answer_vocab: str = "counts"  # VQA classes: counts (majority answers of >= min_answer_count questions) | list
    min_answer_count: int = 9  # VQA answer threshold; 9 on VQA v2 train+val gives the usual 3,129 answers
    vocab: str = ""  # BERT vocab.txt of a from-scratch run (an --init run uses the checkpoint's)
    out_dir: str = ""  # checkpoints, metrics.jsonl, results.json (default: runs/finetune_<task>)
    epochs: float = 0.0  # passes over the training data; 0 = the task's shapes-world default (SHAPES_DEFAULTS)
    max_steps: int = 0  # optimizer steps; 0 = epochs x steps per epoch
    train_fraction: float = 1.0  # use this share of the training rows (the same rows for every seed): low-label runs
    batch_size: int = 32  # per process and micro-batch
    lr: float = 5e-4  # peak learning rate
    head_lr_mult: float = 1.0  # the task's new head learns at head_lr_mult x lr (official EVE: 10 VQA, 2 NLVR2/retrieval)
    warmup_steps: int = -1  # linear warm-up; -1 = warmup_ratio of all steps
    warmup_ratio: float = 0.1  # the warm-up's share of all steps when --warmup-steps is -1 (official: 0.1, NLVR2 0.2)
    recipe: str = "auto"  # own (these defaults) | official (OFFICIAL_RECIPE: EVE's optimizer, schedule, resolution and
    # augmentation; flags given still win) | auto (official for the official architecture: --preset base/large, else own)
    augment: str = "none"  # training images: none | flip (random-resized crop + flip, left/right swapped in the text) |
    # color (flip + colour jitter 0.4) | randaug (flip + RandAugment, 2 ops at 7/10; official VQA): data.augment_draws
    k_test: int = 16  # retrieval: ITM re-ranks each query's top k_test ITC candidates (ALBEF: 128/256); 0 = ITC only
    rank: str = "itc+itm"  # retrieval: candidates ranked by itc | itm (ALBEF) | itc+itm (ITC logit + ITM log-odds)
    objective: str = ""  # what to train: empty = the task's (retrieval: itc_itm, as ALBEF); retrieval also takes itc
    # (the contrastive loss alone: 2 encoder passes per step instead of 5, no ITM head, so it needs --rank itc)
    freeze_backbone: bool = False  # train the task's head only, the encoder frozen: a probe of what an --init
    # checkpoint's representation holds (MAE's linear probing, with the task's own head)
    seed: int = 0  # data order and new-head init
    eval_every: int = 0  # steps between val evaluations (each may update best.pt); 0 = after every epoch. The last
    # step is always evaluated
    save_every: int = 0  # steps between resume checkpoints; 0 = at the end of every epoch
    keep_last: int = 2  # resume checkpoints kept
    resume: str = ""  # auto | path of a checkpoint of this fine-tuning run (a torchrun restart continues by itself)


# what each task trains, on which data, and its val metric: inference.TASKS
# Each task's defaults on the shapes world with the tiny preset, sized for at most 5 minutes on 2 CPU cores (README:
# "Fine-tuning and evaluation", measured). A flag given on the command line wins. Retrieval trains the contrastive
# loss alone and ranks by it: a step is 2 encoder passes instead of ITC+ITM's 5, so that 5 minutes hold 4x the steps.
# Retrieval's lr is 2e-4: at VQA's 5e-4 its seeds were erratic (README: "Retrieval's learning rate"); its ITC
# temperature starts at 0.1, not the tiny preset's 0.3, which a pre-trained model barely moves from in 400 steps
# (README: "Retrieval's temperature"). Model fields here (itc_temp) are set like a flag, also over an --init's value.
SHAPES_DEFAULTS = {"vqa": dict(epochs=1.0), "nlvr2": dict(epochs=4.0),
                   "retrieval": dict(epochs=0.64, objective="itc", rank="itc", lr=2e-4, itc_temp=0.1)}
MODEL_FIELDS = {f.name for f in fields(EVEConfig)}
# The official EVE fine-tuning recipe (github ssyze/EVE: configs/VQA_beit_480_vg.yaml, NLVR_vit_lrtest_5e-5.yaml,
# Retrieval_{coco,flickr}_ft.yaml; optim.py, scheduler.py, dataset/__init__.py), used by --recipe official: AdamW
# betas (0.9, 0.98), weight decay 0.01, decay to 0 after the warm-up, 10 epochs, the head_lr_mult of new heads (its
# lr_mult), grad clip, the fine-tuning resolution (image_size: position embeddings resized) and augmentation per task.
# Batch sizes (16/16/18 per GPU there) are left to --batch-size. One difference on purpose: the official NLVR2 and VQA
# flips keep the text (VQA skips the flip when "left"/"right" occurs); here a flip swaps left and right in the text.
OFFICIAL_RECIPE = {
    "vqa": dict(lr=3e-5, head_lr_mult=10.0, schedule="linear", warmup_ratio=0.1, grad_clip=3.0, image_size=480,
                augment="randaug"),
    "nlvr2": dict(lr=5e-5, head_lr_mult=2.0, schedule="cosine", warmup_ratio=0.2, grad_clip=3.0, image_size=384,
                  augment="flip"),
    "retrieval": dict(lr=3e-5, head_lr_mult=2.0, schedule="linear", warmup_ratio=0.1, grad_clip=1.0, image_size=384,
                      augment="flip"),
}
OFFICIAL_COMMON = dict(weight_decay=0.01, adam_beta2=0.98, min_lr_ratio=0.0, epochs=10.0)
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # VQA target of an answer given by 0, 1, 2, 3, 4+ annotators


# ---- VQA answers -------------------------------------------------------------------------

def answer_vocabulary(rows, min_count):
    """The answers that are the majority answer of at least min_count training questions, most frequent
    first. Counting each question's majority answer (VQA v2's multiple_choice_answer) is the recipe of
    bottom-up attention, ViLT and VLMo: on VQA v2 train+val with min_count=9 it gives their 3,129 classes."""
    majority = Counter()
    for row in rows:
        answers = [evaluate.normalize_vqa_answer(a) for a in evaluate.human_answers(row)]
        if answers:
            majority[Counter(answers).most_common(1)[0][0]] += 1
    return sorted((a for a, n in majority.items() if n >= min_count), key=lambda a: (-majority[a], a))


def soft_scores(human_answers, answer_index):
    """{class: soft score} of one question (SOFT_SCORES by annotator count) and how many of its human
    answers fall outside the answer vocabulary (they are ignored)."""
    counts = Counter(evaluate.normalize_vqa_answer(a) for a in human_answers)
    scores = {answer_index[a]: SOFT_SCORES[min(n, 4)] for a, n in counts.items() if a in answer_index}
    return scores, sum(n for a, n in counts.items() if a not in answer_index)


def vqa_targets(answer_lists, answer_index):
    """Soft targets [B, num_answers] for the binary cross-entropy of model.loss_vqa."""
    targets = torch.zeros(len(answer_lists), len(answer_index))
    for b, answers in enumerate(answer_lists):
        for k, score in soft_scores(answers, answer_index)[0].items():
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
        answers = list(dict.fromkeys(evaluate.normalize_vqa_answer(a) for a in listed))  # normalised, deduplicated
    elif fc.answer_vocab == "counts":
        answers = answer_vocabulary(rows, fc.min_answer_count)
    else:
        raise SystemExit(f"error: --answer-vocab must be counts or list, not {fc.answer_vocab!r}")
    if not answers:
        raise SystemExit(f"error: the answer vocabulary is empty (--answer-vocab {fc.answer_vocab}: no answer is the "
                         f"majority answer of {fc.min_answer_count} training questions, or an empty --answer-list)")
    index = {a: i for i, a in enumerate(answers)}
    per_row = [soft_scores(evaluate.human_answers(r), index) for r in rows]
    n_humans = sum(len(evaluate.human_answers(r)) for r in rows)
    ignored, no_target = sum(n for _, n in per_row), sum(not s for s, _ in per_row)
    if verbose:
        print(f"answer vocabulary: {len(answers)} answers ({fc.answer_vocab}); {ignored} of {n_humans} human answers "
              f"({100 * ignored / max(1, n_humans):.1f}%) are outside it and ignored; {no_target} questions have no target")
    return answers


# ---- set-up ------------------------------------------------------------------------------

def resolve_paths(fc, rank, world, given=frozenset()):
    """The config with every data path filled in: own files, or the shapes world's for the task (and its
    SHAPES_DEFAULTS for the fields not `given` on the command line)."""
    own = [fc.train_json, fc.val_json, fc.test_json]
    if any(own) and not all(own):
        raise SystemExit("error: own data needs all of --train-json, --val-json and --test-json")
    out = {"out_dir": fc.out_dir or f"runs/finetune_{fc.task}", "epochs": fc.epochs or SHAPES_DEFAULTS[fc.task]["epochs"]}
    if all(own):
        out["image_root"] = fc.image_root or str(Path(fc.train_json).parent)
    else:
        paths = {k: str(v) for k, v in shapes_world(fc.data_dir, rank, world).items()}
        paired = {"objective", "rank"}  # the two go together: a given one keeps the other's own default
        out.update({k: v for k, v in SHAPES_DEFAULTS[fc.task].items() if k != "epochs" and k not in MODEL_FIELDS
                    and k not in given and not (k in paired and paired & set(given))})
        out.update({f"{s}_json": paths[f"{fc.task}_{s}"] for s in ("train", "val", "test")},
                   image_root=fc.image_root or paths["root"], answer_list=fc.answer_list or paths["answer_list"],
                   vocab=fc.vocab or (paths["vocab"] if not fc.init and not fc.bpe else ""))
    return replace(fc, **out)


def model_overrides(fc, flags):
    """The model fields to set: those given on the command line (flags), over the task's model defaults in
    SHAPES_DEFAULTS (e.g. retrieval's itc_temp) when it trains on the shapes world."""
    shapes = {} if fc.train_json else {k: v for k, v in SHAPES_DEFAULTS[fc.task].items() if k in MODEL_FIELDS}
    return {**shapes, **flags}


def base_config(fc, overrides, rank):
    """(EVEConfig, tokenizer, init checkpoint or None) of a new run; the task fields are set later."""
    try:
        given = load_tokenizer(fc.vocab, fc.bpe) if fc.vocab or fc.bpe else None
    except ValueError as e:  # a missing or malformed file: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    if not fc.init:
        if given is None:
            raise SystemExit("error: own data from scratch needs --vocab (a vocab.txt) or --bpe (vocab.json + merges.txt)")
        return make_config(fc.preset, **{"vocab_size": len(given), **overrides}), given, None
    if not Path(fc.init).is_file():
        raise SystemExit(f"error: --init {fc.init}: no such checkpoint file")
    ckpt = checkpoints.load_checkpoint(fc.init)
    released = official.state_dict_of(ckpt)
    if released is not None:  # a released EVE checkpoint: the architecture from its shapes, names mapped in load_init
        if given is None:
            raise SystemExit(f"error: --init {fc.init} is an official EVE checkpoint, which carries no vocabulary: "
                             "give its tokenizer with --bpe DIR (vocab.json + merges.txt)")
        cfg = official.official_config(released, **overrides)
        if len(given) > cfg.vocab_size:
            raise SystemExit(f"error: the tokenizer has {len(given)} tokens, {fc.init} embeds {cfg.vocab_size}")
        return cfg, given, {"official": released}
    if not all(k in ckpt for k in ("model", "config", "vocab")):
        raise SystemExit(f"error: --init {fc.init}: not a pretrain.py checkpoint (needs model, config and vocab)")
    tokenizer = tokenizer_from_state(ckpt["vocab"])  # the vocabulary travels in the checkpoint
    if given is not None and given.state != tokenizer.state:
        raise SystemExit(f"error: --{'bpe' if fc.bpe else 'vocab'} {fc.bpe or fc.vocab} differs from the vocabulary of {fc.init}")
    if rank == 0 and overrides:  # e.g. --drop-path; one that changes a tensor shape fails when loading
        print(f"overriding the checkpoint's model config with {overrides}")
    return EVEConfig(**{**ckpt["config"], **overrides}), tokenizer, ckpt


POS_TABLES = ("image_pos", "decoder.pos_embed")  # (1, 1 + patches, D): resized when fine-tuning at another resolution


def apply_recipe(fc, cfg, given, fresh=True):
    """(fc, cfg) with the official recipe's values (OFFICIAL_RECIPE) for every field not `given` on the command line,
    when --recipe official, or auto and the model is the official architecture (model.OFFICIAL's values: the base and
    large presets, official checkpoints). fresh=False (a resumed run) keeps the checkpoint's image size."""
    if fc.recipe not in ("auto", "own", "official"):
        raise SystemExit(f"error: --recipe must be auto, own or official, not {fc.recipe!r}")
    official_model = all(getattr(cfg, k) == v for k, v in OFFICIAL.items())
    if fc.recipe == "own" or (fc.recipe == "auto" and not official_model):
        return fc, cfg
    values = {k: v for k, v in {**OFFICIAL_COMMON, **OFFICIAL_RECIPE[fc.task]}.items() if k not in given}
    if fresh and "image_size" in values:
        cfg = replace(cfg, image_size=values["image_size"])
    return replace(fc, **{k: v for k, v in values.items() if k != "image_size"}), cfg


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


# ---- the run -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_dataclass_args(parser, FinetuneConfig)
    training.add_dataclass_args(parser, EVEConfig, defaults=False,
                                title="model (defaults: the preset's, or with --init the checkpoint's)")
    return parser.parse_args(argv)


def check_choices(fc):
    """Stop with one line on a --rank or --objective this task cannot take. Returns fc."""
    if fc.rank not in inference.RANK_MODES:
        raise SystemExit(f"error: --rank must be one of {', '.join(inference.RANK_MODES)}, not {fc.rank!r}")
    objectives = {inference.TASKS[fc.task].objective} | ({"itc"} if fc.task == "retrieval" else set())
    if fc.objective and fc.objective not in objectives:
        raise SystemExit(f"error: --objective for --task {fc.task} must be one of {sorted(objectives)}, not {fc.objective!r}")
    if fc.objective == "itc" and fc.rank != "itc" and fc.k_test > 0:
        raise SystemExit("error: --objective itc trains no ITM head: rank with --rank itc (or --k-test 0)")
    return fc


def given_flags(argv=None):
    """The names of the fields given on the command line (a flag given at its default value counts too)."""
    parser = argparse.ArgumentParser(add_help=False)
    training.add_dataclass_args(parser, FinetuneConfig, defaults=False)
    training.add_dataclass_args(parser, EVEConfig, defaults=False)
    return {k for k, v in vars(parser.parse_known_args(argv)[0]).items() if v is not None}


def main(argv=None):
    args = parse_args(argv)
    fc = FinetuneConfig(**training.pick_fields(args, FinetuneConfig))
    if fc.task not in inference.TASKS:
        raise SystemExit(f"error: --task must be one of {sorted(inference.TASKS)}, not {fc.task!r}")
    overrides = training.pick_fields(args, EVEConfig, skip_none=True)
    overrides = {k: v for k, v in overrides.items() if k not in ("num_answers", "nlvr2_head")}  # set by the task
    overrides = model_overrides(fc, overrides)
    rank, world, _, device = training.setup_distributed(fc.seed)
    try:
        given = given_flags(argv)
        return run(check_choices(resolve_paths(fc, rank, world, given)), overrides, rank, world, device, given)
    except data.DataError as e:  # bad rows or images, in training or evaluation: one clean line
        raise training.data_error_exit(e) from None
    finally:
        training.cleanup_distributed()


def run(fc, overrides, rank, world, device, given=frozenset()):
    resume_path, resume = checkpoints.load_resume(fc.resume, fc.out_dir, verbose=rank == 0)
    if resume:  # the run's model, vocabulary and answers are the checkpoint's
        if resume.get("finetune_config", {}).get("task") != fc.task:
            raise SystemExit(f"error: {resume_path} is not a checkpoint of a --task {fc.task} fine-tuning run")
        cfg, tokenizer, init = EVEConfig(**resume["config"]), tokenizer_from_state(resume["vocab"]), None
    else:
        cfg, tokenizer, init = base_config(fc, overrides, rank)
    fc, cfg = apply_recipe(fc, cfg, given, fresh=not resume)
    if fc.augment not in data.AUGMENTS:
        raise SystemExit(f"error: --augment must be one of {', '.join(data.AUGMENTS)}, not {fc.augment!r}")
    task = inference.TASKS[fc.task]
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
    cfg = replace(cfg, num_answers=len(answers) if answers else 0, nlvr2_head=fc.task == "nlvr2")
    loader = data.make_loader(train_set, fc.batch_size, data.Collator(tokenizer, cfg.max_text_len), shuffle=True,
                              seed=fc.seed, num_workers=fc.num_workers, drop_last=True, distributed=world > 1)
    steps_per_epoch = len(loader) // fc.grad_accum  # as fit() counts them
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {fc.train_json} has {len(train_set)} rows, fewer than one step of "
                         f"{fc.batch_size * fc.grad_accum * world}")
    max_steps = fc.max_steps or max(1, round(fc.epochs * steps_per_epoch))
    fc = replace(fc, max_steps=max_steps, save_every=fc.save_every or steps_per_epoch,
                 warmup_steps=fc.warmup_steps if fc.warmup_steps >= 0 else int(max_steps * fc.warmup_ratio))

    model = EVE(cfg).to(device)
    if init:
        load_init(model, init, fc.init, verbose=rank == 0)
        if "itc_temp" in overrides:  # a given (or shapes-default) starting temperature wins over the checkpoint's tensor
            with torch.no_grad():
                model.temp.fill_(cfg.itc_temp)
    objective = fc.objective or task.objective
    model.freeze_unused_heads(objective, backbone=fc.freeze_backbone)
    opt, sched = training.make_optimizer(model, fc, heads=TASK_HEADS[objective], head_lr_mult=fc.head_lr_mult)
    progress = training.restore(resume, resume_path, model, opt, sched, rank, world) if resume else {}
    step = progress.get("step", 0)
    out_dir, key = Path(fc.out_dir), task.metric
    best_path = out_dir / "best.pt"
    best = {"metric": -math.inf, "step": 0, "val": None}  # the val score of best.pt
    if resume:  # best.pt may be newer than the resume checkpoint
        best = checkpoints.load_checkpoint(best_path)["best"] if best_path.exists() else resume["best"]
    log = training.MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)

    def state():  # what every checkpoint holds besides the weights and the optimizer
        return dict(config=asdict(cfg), finetune_config=asdict(fc), vocab=tokenizer.state, answers=answers, best=best)

    if rank == 0:
        print(cfg)
        print(f"{fc.task}: {len(train_set)} training rows, {steps_per_epoch} steps per epoch, {max_steps} steps, "
              f"device {device}, {world} process(es)" + (f", resumed from {resume_path} at step {step}" if resume else ""))

    def score(split, step):
        predictions = out_dir / f"{fc.task}_{split}_predictions.json" if fc.task != "retrieval" else None
        metrics = inference.evaluate_split(fc.task, model, tokenizer, getattr(fc, f"{split}_json"), fc.image_root,
                                           device, answers=answers, k_test=fc.k_test, rank=fc.rank,
                                           batch_size=2 * fc.batch_size, num_workers=fc.num_workers,
                                           skip_bad=fc.skip_bad, predictions_path=predictions)
        log.write(step=step, split=split, **metrics)
        return metrics

    def after_step(step, batch, out):
        if step % (fc.eval_every or steps_per_epoch) and step != max_steps:
            return
        if rank == 0:  # one process evaluates the whole split; the others wait below
            metrics = score("val", step)
            print(f"\nval at step {step} (epoch {step / steps_per_epoch:.2f}): {key} {metrics.get(key, math.nan):.2f}")
            if key not in metrics or metrics[key] > best["metric"]:  # no score (VQA val without answers): the latest
                best.update(metric=metrics.get(key, -math.inf), step=step, val=metrics)
                checkpoints.atomic_save(dict(model=model.state_dict(), step=step, **state()), best_path)
            model.train()
        if world > 1:
            dist.barrier()

    index = {a: i for i, a in enumerate(answers or [])}
    prepare = (lambda b: {**b, "vqa_targets": vqa_targets(b["answers"], index).to(device)}) if answers else None
    t0 = time.time()
    step = training.fit(model, loader, opt, sched, fc, objective, device, rank, world, progress, prepare=prepare,
                        after_step=after_step, extra_state=state, desc=f"finetune {fc.task}")
    if rank != 0 or step < max_steps:  # stopped by a signal: no test yet
        return None
    fit_s = time.time() - t0
    checkpoints.load_model_state(model, checkpoints.load_checkpoint(best_path)["model"], best_path)
    test = score("test", step)
    results = {"task": fc.task, "checkpoint": str(best_path), "best_step": best["step"], "val": best["val"],
               "test": test, "fit_seconds": round(fit_s), "test_seconds": round(time.time() - t0 - fit_s)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ntest ({fc.test_json}, best val step {best['step']}):")
    print(evaluate.format_table(evaluate.metrics_table(fc.task, test)))
    print(f"results: {out_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
