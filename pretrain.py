"""Pre-train EVE by masked signal modeling (or the ITC+ITM baseline it is compared with).

CPU, the tiny preset on the built-in shapes world (generated on first use):
    python pretrain.py
One GPU, the base preset on your own data (ALBEF-style JSON, a BERT vocab.txt):
    python pretrain.py --preset base --train-json pretrain.json --image-root /data/images --vocab vocab.txt
Several GPUs (one node), or CPU processes with Gloo:
    torchrun --standalone --nproc_per_node=4 pretrain.py --preset base ...
Several nodes: torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:PORT --nproc_per_node=8 pretrain.py ...
The baseline and the ablations:
    python pretrain.py --objective itc_itm          # or msm+itc_itm, itc_itm+mlm
    python pretrain.py --top-ffn dense --ffn dense  # or --no-modality-routing, --num-experts 4, --top-k 1, ...
Resume: python pretrain.py --resume auto (last.pt of --out-dir) or --resume PATH.

MSM has no in-batch negatives, so gradient accumulation over k micro-batches equals one
k-times larger batch exactly (up to the per-batch loss means); ITC's negatives are per
micro-batch, so for itc_itm accumulation is an approximation.
"""
import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Transparent huge pages for CPU tensors of 2 MB or more (0 opts out): see bench.py. Set before the
# imports below, because PyTorch reads it at its first CPU allocation and importing data.py makes one.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import checkpoints  # noqa: E402
import data  # noqa: E402
import pictures  # noqa: E402
import training  # noqa: E402
from masking import mask_text  # noqa: E402
from model import EVE, EVEConfig, make_config  # noqa: E402
from shapes import shapes_world  # noqa: E402
from tokenization import load_tokenizer  # noqa: E402


@dataclass
class TrainConfig(training.TrainingConfig):
    """pretrain.py's options: the shared ones (training.TrainingConfig), its own, and its defaults."""
    objective: str = "msm"  # msm | itc_itm | msm+itc_itm | itc_itm+mlm
    train_json: str = ""  # your own pre-training JSON (else the shapes world's)
    out_dir: str = "runs/pretrain"  # checkpoints, metrics.jsonl and pictures
    max_steps: int = 900  # optimizer steps; the LR schedule spans them, also under --max-seconds
    max_seconds: float = 0.0  # wall-clock budget: stop at the first step past it, save, report (0 = off); set --max-steps large
    batch_size: int = 32  # per process and micro-batch (on 2 CPU cores 32 trains more samples/s than 64, and the pixel
    # decoder needs steps: README)
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 200  # linear warm-up (a longer one lets the pixel decoder paint better in 900 steps: README)
    text_mask_ratio: float = 0.5  # share of real text tokens masked
    bert_replace: bool = False  # BERT's 80/10/10 replacement of masked tokens
    augment: bool = True  # mild crop and left/right-swapping flip
    picture_every: int = 200  # steps between PNG pictures


def build_data(tc, rank, world):
    """The tokenizer and the loader of the pre-training pairs."""
    if tc.train_json:
        json_path = Path(tc.train_json)
        image_root = tc.image_root or json_path.parent
        if not tc.vocab and not tc.bpe:
            raise SystemExit("error: --train-json needs --vocab (a BERT vocab.txt) or --bpe (vocab.json + merges.txt)")
        vocab = tc.vocab
    else:
        paths = shapes_world(tc.data_dir, rank, world)
        json_path, image_root, vocab = paths["pretrain"], paths["root"], tc.vocab or ("" if tc.bpe else paths["vocab"])
    try:
        tokenizer = load_tokenizer(vocab, tc.bpe)
    except ValueError as e:  # a missing or malformed file: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    return tokenizer, json_path, image_root


def masked_text_batch(batch, tokenizer, tc):
    ids, labels = mask_text(batch["text_ids"], tokenizer.special_ids, tokenizer.mask_id, len(tokenizer),
                            tc.text_mask_ratio, tc.bert_replace)
    return {**batch, "mlm_ids": ids, "mlm_labels": labels}


# ---- the run -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_dataclass_args(parser, TrainConfig)
    training.add_dataclass_args(parser, EVEConfig, defaults=False, title="model (defaults: the preset's)")
    return parser.parse_args(argv)


def main(argv=None):
    """Parse flags, set up DDP, pre-train; returns the trained model (handy in a notebook)."""
    args = parse_args(argv)
    tc = TrainConfig(**training.pick_fields(args, TrainConfig))
    rank, world, _, device = training.setup_distributed(tc.seed)
    try:
        return run(tc, training.pick_fields(args, EVEConfig, skip_none=True), rank, world, device)
    except data.DataError as e:
        raise training.data_error_exit(e) from None
    finally:
        training.cleanup_distributed()


def run(tc, model_overrides, rank, world, device):
    tokenizer, json_path, image_root = build_data(tc, rank, world)
    ckpt_path, ckpt = checkpoints.load_resume(tc.resume, tc.out_dir, verbose=rank == 0)
    if ckpt:  # the run's model is the checkpoint's; flags cannot change it midway
        cfg = EVEConfig(**ckpt["config"])
        if ckpt["vocab"] != tokenizer.state:
            raise SystemExit(f"error: {ckpt_path} was trained with another vocabulary than {tc.bpe or tc.vocab or 'the shapes world'}")
    else:
        cfg = make_config(tc.preset, **{"vocab_size": len(tokenizer), **model_overrides})
    if cfg.vocab_size != len(tokenizer):
        raise SystemExit(f"error: the model has vocab_size={cfg.vocab_size} but {tc.vocab or 'the vocabulary'} has {len(tokenizer)} tokens")
    dataset = data.PretrainDataset(json_path, image_root, cfg.image_size, augment=tc.augment, seed=tc.seed, skip_bad=tc.skip_bad)
    loader = data.make_loader(dataset, tc.batch_size, data.Collator(tokenizer, cfg.max_text_len), shuffle=True,
                              seed=tc.seed, num_workers=tc.num_workers, drop_last=True, distributed=world > 1)
    if len(loader) < tc.grad_accum:
        raise SystemExit(f"error: {json_path} has {len(dataset)} pairs, fewer than one step of {tc.batch_size * tc.grad_accum * world}")

    model = EVE(cfg).to(device)
    model.freeze_unused_heads(tc.objective)  # DDP then needs no find_unused_parameters
    opt, sched = training.make_optimizer(model, tc)
    progress = training.restore(ckpt, ckpt_path, model, opt, sched, rank, world) if ckpt else {}
    step = progress.get("step", 0)
    if rank == 0:
        print(cfg)
        print(f"{len(dataset)} pairs, {len(loader) // tc.grad_accum} steps per epoch, objective {tc.objective}, "
              f"device {device}, {world} process(es)" + (f", resumed from {ckpt_path} at step {step}" if ckpt else ""))
    out_dir = Path(tc.out_dir)

    log = training.MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)

    def after_step(step, batch, out):
        if rank != 0:
            return
        if "pred" in out and (step % tc.log_every == 0 or step == tc.max_steps):
            log.write(step=step, recon_fg_ratio=pictures.foreground_ratio(batch["image"], out["pred"], out["mask"], cfg))
        if step % tc.picture_every == 0 or step == tc.max_steps:
            out_dir.mkdir(parents=True, exist_ok=True)
            if "pred" in out:
                pictures.save_reconstruction(out_dir / f"recon_{step:07d}.png", batch["image"], out["pred"], out["mask"], cfg)
            if "moe_load" in out:
                pictures.save_expert_usage(out_dir / f"experts_{step:07d}.png", out["moe_load"])
                n = min(4, len(batch["image"]))
                experts = pictures.first_experts(model, batch["image"][:n], batch["text_ids"][:n], batch["text_mask"][:n])
                pictures.save_routing(out_dir / f"routing_{step:07d}.png", batch["image"][:n], batch["text_ids"][:n],
                                      batch["text_mask"][:n], experts, tokenizer, cfg)
                model.train()

    t0 = time.time()
    step = training.fit(model, loader, opt, sched, tc, tc.objective, device, rank, world, progress,
                        prepare=lambda b: masked_text_batch(b, tokenizer, tc), after_step=after_step,
                        extra_state=lambda: dict(config=asdict(cfg), train_config=asdict(tc), vocab=tokenizer.state),
                        desc="pretrain", max_seconds=tc.max_seconds)
    if rank == 0 and step >= tc.max_steps:
        print(f"done: {step} steps in {time.time() - t0:.0f}s; checkpoint {out_dir / 'last.pt'}, log {out_dir / 'metrics.jsonl'}")
    return model


if __name__ == "__main__":
    main()
