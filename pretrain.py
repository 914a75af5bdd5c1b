"""Pre-train EVE by masked signal modeling (or the ITC+ITM baseline it is compared with).

CPU, the tiny preset on the built-in shapes world (generated on first use):
    python pretrain.py
One GPU, the base preset on your own data (ALBEF-style JSON, a BERT vocab.txt), 256 pairs per step in
micro-batches of 64:
    python pretrain.py --preset base --train-json pretrain.json --image-root /data/images --vocab vocab.txt \\
        --batch-size 256 --micro-batch 64
Several GPUs (one node), or CPU processes with Gloo: the same steps, a micro-batch of 64 on each of 4 GPUs:
    torchrun --standalone --nproc_per_node=4 pretrain.py --preset base ... --batch-size 256 --micro-batch 64
Several nodes: torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:PORT --nproc_per_node=8 pretrain.py ...
The baseline and the ablations:
    python pretrain.py --objective itc_itm          # or msm+itc_itm, itc_itm+mlm
    python pretrain.py --top-ffn dense --ffn dense  # or --no-modality-routing, --num-experts 4, --top-k 1, ...
Resume: python pretrain.py --resume auto (last.pt of --out-dir) or --resume PATH.

--batch-size is the global batch: the pairs of one optimizer step, all processes together. Each process
runs micro-batches of --micro-batch pairs (default: batch-size / processes) and accumulates the gradients of
batch-size / (micro-batch x processes) of them. Which pairs form each micro-batch of a step, and its random
draws (masks, dropout), depend only on its place in the data (data.GlobalBatchSampler,
resilience.micro_batch_seed), not on the process that runs it: with the same --batch-size and --micro-batch,
MSM on 1, 2 or 4 processes ends with the same parameters, to float rounding (tests/test_global_batch.py).
With the default --micro-batch the steps hold the same pairs, cut into other micro-batches. Objectives with
in-batch negatives differ with the process count: ITC gathers the features of all processes (as ALBEF does)
but not those of the micro-batches accumulated on one (that needs all of them at once, GradCache's two passes;
not done here), and ITM draws its hard negatives within each micro-batch.
"""
import argparse
import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import checkpoints
import data
import pictures
import probe
import resilience
import training
from masking import mask_text
from heads import EVEWithHeads
from model import EVEConfig, make_config
from shapes import shapes_world
from tokenization import load_tokenizer
from training import option


@dataclass
class TrainConfig(training.TrainingConfig):
    """pretrain.py's options: the shared ones (training.TrainingConfig), its own, and its defaults."""
    objective: str = option("msm", "msm (EVE) | itc_itm (the baseline) | msm+itc_itm | itc_itm+mlm")
    out_dir: str = option("runs/pretrain", "checkpoints, metrics.jsonl and pictures")
    max_steps: int = option(900, "optimizer steps; the LR schedule spans them, also under --max-seconds")
    max_seconds: float = option(0.0, "wall-clock budget: stop at the first step past it, save and report (0 = off)")
    lr: float = option(1e-3, "peak learning rate")
    warmup_steps: int = option(200, "linear warm-up steps")
    text_mask_ratio: float = option(0.5, "share of real text tokens masked")
    bert_replace: bool = False  # BERT's 80/10/10 replacement of masked tokens (off: every masked token is [MASK])
    augment: bool = option(True, "mild random crop and a flip that swaps left and right in the caption")
    picture_every: int = option(200, "steps between PNG pictures")
    probe_every: int = option(100, "steps between concept-probe scores in metrics.jsonl (probe.py; the shapes world "
                                  "only; 0 = off)")


# the model fields a pre-training run may set over the preset (model.make_config's names), with their help
PROBE_ITEMS = 40  # items of each kind in the probe logged while training (python probe.py asks them all)

MODEL_FLAGS = {"image_size": "input resolution (square)", "patch_size": "patch side in pixels",
               "dim": "encoder width", "depth": "encoder layers", "heads": "attention heads",
               "ffn": "FFN of the lower layers: multiway | moe | dense", "top_ffn": "FFN of the top layers",
               "top_layers": "how many top layers use --top-ffn", "num_experts": "experts per MoE layer",
               "top_k": "experts per token", "modality_routing": "the router is told each token's modality",
               "image_mask_ratio": "share of patches removed (MSM)", "image_masking": "random (MAE) | block (BEiT)",
               "norm_pix_loss": "per-patch normalised pixel target (MAE)"}


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
    """The flags given (and only those): a Namespace."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_flags(parser, "training", dataclasses.fields(TrainConfig))
    training.add_flags(parser, "model (defaults: the preset's)", training.model_fields(MODEL_FLAGS), MODEL_FLAGS)
    return parser.parse_args(argv)


def main(argv=None):
    """Parse flags, set up DDP, pre-train; returns the trained model (handy in a notebook)."""
    data.use_huge_pages()  # before the first tensor
    own, model_overrides = training.split_given(vars(parse_args(argv)), TrainConfig)
    tc = TrainConfig(**own)
    rank, world, _, device = training.setup_distributed(tc.seed)
    try:
        return run(tc, model_overrides, rank, world, device)
    except data.DataError as e:
        raise training.data_error_exit(e) from None
    finally:
        training.cleanup_distributed()


def run(tc, model_overrides, rank, world, device):
    tc = training.split_batch(tc, world)  # micro_batch and grad_accum from the global --batch-size
    tokenizer, json_path, image_root = build_data(tc, rank, world)
    ckpt_path, ckpt = checkpoints.load_resume(tc.resume, tc.out_dir, verbose=rank == 0)
    if ckpt:  # the run's model is the checkpoint's; flags cannot change it midway
        cfg = checkpoints.model_config(ckpt, ckpt_path, EVEConfig)
        if ckpt["vocab"] != tokenizer.state:
            raise SystemExit(f"error: {ckpt_path} was trained with another vocabulary than {tc.bpe or tc.vocab or 'the shapes world'}")
    else:
        cfg = make_config(tc.preset, **{"vocab_size": len(tokenizer), "pad_id": tokenizer.pad_id, **model_overrides})
    if cfg.vocab_size != len(tokenizer):
        raise SystemExit(f"error: the model has vocab_size={cfg.vocab_size} but {tc.vocab or 'the vocabulary'} has {len(tokenizer)} tokens")
    dataset = data.PretrainDataset(json_path, image_root, cfg.image_size, augment=tc.augment, seed=tc.seed, skip_bad=tc.skip_bad)
    loader = data.make_loader(dataset, tc.micro_batch, data.Collator(tokenizer, cfg.max_text_len), shuffle=True,
                              seed=tc.seed, num_workers=tc.num_workers, drop_last=True, accum=tc.grad_accum,
                              rank=rank, world=world)
    if len(loader) == 0:
        raise SystemExit(f"error: {json_path} has {len(dataset)} pairs, fewer than one step of {tc.batch_size}")

    model = EVEWithHeads(cfg).to(device)
    model.freeze_unused_heads(tc.objective)  # DDP then needs no find_unused_parameters
    opt, sched = training.make_optimizer(model, tc)
    progress = checkpoints.restore(ckpt, ckpt_path, model, opt, sched, rank, world) if ckpt else {}
    step = progress.get("step", 0)
    if rank == 0:
        print(cfg)
        print(f"{len(dataset)} pairs, {len(loader) // tc.grad_accum} steps per epoch of {tc.batch_size} ({world} "
              f"process(es) x {tc.grad_accum} micro-batch(es) of {tc.micro_batch}), objective {tc.objective}, "
              f"device {device}" + (f", resumed from {ckpt_path} at step {step}" if ckpt else ""))
    out_dir = Path(tc.out_dir)

    log = training.MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)
    # what the MLM fills in from the image, kind by kind, on a fixed subset of the held-out scenes
    concepts = None
    if rank == 0 and tc.probe_every and not tc.train_json and tc.objective != "itc_itm":  # needs the MLM head
        concepts = probe.Probe(tc.data_dir, tokenizer, cfg.image_size, per_kind=PROBE_ITEMS)

    def after_step(step, batch, out):
        if rank != 0:
            return
        if "pred" in out and (step % tc.log_every == 0 or step == tc.max_steps):
            log.write(step=step, recon_fg_ratio=pictures.foreground_ratio(batch["image"], out["pred"], out["mask"], cfg))
        if concepts and (step % tc.probe_every == 0 or step == tc.max_steps):
            log.write(step=step, **concepts.scores(model, device))
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
    run_state = resilience.Run(progress, max_seconds=tc.max_seconds,
                         extra_state=lambda: dict(config=asdict(cfg), train_config=asdict(tc), vocab=tokenizer.state))
    step = training.fit(model, loader, opt, sched, tc, tc.objective, device, rank, world, run_state,
                        prepare=lambda b: masked_text_batch(b, tokenizer, tc), after_step=after_step)
    if rank == 0 and step >= tc.max_steps:
        print(f"done: {step} steps in {time.time() - t0:.0f}s; checkpoint {out_dir / 'last.pt'}, log {out_dir / 'metrics.jsonl'}")
    return model


if __name__ == "__main__":
    main()
