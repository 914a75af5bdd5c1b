"""Speed benchmarks of EVE: MSM against ITC+ITM, the MoE layer against dense and one-hot
dispatch, model FLOP utilisation, and how a step grows with the mask ratio and resolution.

CPU, 2 cores: the tiny preset (a minute or two), then base at batch 8 (a few minutes, several GB):
    python bench.py --preset tiny --json bench_tiny.json
    python bench.py --preset base --repeats 3 --json bench_base.json
    python bench.py --preset tiny --tables     # also the mask-ratio, MoE token-count and resolution tables
One GPU (bf16 autocast by default there; --dtype fp32 for the fp32 figures):
    python bench.py --preset base --device cuda --json bench_base_gpu.json
    bash gpu_check.sh     # this, 20 base pre-training steps in bf16 and a 2-process torchrun: under 5 minutes
Smoke run (one repeat): python bench.py --quick
bf16 rows on a CPU: timed only where a small probe finds bf16 matmuls at least half as fast as fp32
(CPUs without AVX512-BF16 or AMX emulate bf16, far slower); --bf16 on|off forces it.
Where the time goes (torch.profiler tables of an MSM step and of the MoE layer): add --profile
HF ViLT against EVE of the same sizes (needs transformers; bench_peer.py says how): add --peer
    python bench.py --preset tiny --peer --json out.json

Everything runs in ONE process on the same weights and the same synthetic batch. Variants
being compared are timed alternately (a, b, a, b, ...) after a warm-up, and the median is
reported, so that a load spike on a shared machine hurts all of them alike. Another
process's threads on the same cores can still slow a whole group many times over: the
script warns when the repeats of a variant differ by more than 1.5x. Speed is never
asserted by tests; tests/test_bench.py checks only that this script is correct. How things are
measured (timing, FLOPs, profiles, peaks) is in profiling.py; the ViLT comparison in bench_peer.py.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import training
from training import option
from bench_peer import bench_peer, peer_report_rows
from masking import mask_text
from heads import EVEWithHeads
from model import make_config
from moe import MoE, MoEConfig
from profiling import (CLS, MASK, PAD, SEP, bench_matmul, bench_memory_bandwidth, count_flops, cpu_info,
                       make_optimizer, peak_memory_mb, print_profile, probe_bf16, time_alternating)
DEFAULT_BATCH = {"tiny": 32, "small": 32, "base": 8, "large": 8}
MASK_RATIOS = (0.0, 0.25, 0.5, 0.75, 0.9)  # 0.0: masked text with the full image, no pixel loss
RESOLUTIONS = (1.0, 1.5, 2.0)  # times the preset's image size, same patch size
MOE_TOKENS = (512, 2048, 8192)  # tokens per MoE layer in the scaling table


@dataclass
class BenchOptions:
    preset: str = option("tiny", "model preset: tiny | small | base | large")
    device: str = option("", "cpu | cuda; empty = cuda if available")
    dtype: str = option("", "fp32 | bf16; empty = bf16 on cuda, fp32 on cpu")
    batch_size: int = option(0, "0 = 32 for tiny/small, 8 for base/large")
    vocab_size: int = option(0, "0 = 1000 for tiny (a shapes-world vocabulary), else the preset's 30522")
    repeats: int = option(5, "timed calls per variant; the median is reported")
    warmup: int = option(2, "untimed calls per variant before timing")
    tokens: int = option(0, "tokens of the MoE-layer benchmark; 0 = what the MSM batch sends through a MoE layer")
    experts: int = option(32, "experts of the MoE layer in the one-hot dispatch comparison")
    capacity_factor: float = option(2.0, "capacity of the one-hot baseline, a multiple of the fair share")
    matmul_size: int = option(0, "side of the square matmuls that measure the peak FLOP/s; 0 = 2048 on CPU, 8192 on GPU")
    json: str = option("", "also write the results to this JSON file")
    quick: bool = option(False, "one repeat, one warm-up (tests, smoke runs)")
    seed: int = option(0, "weights, batch and masks")
    threads: int = option(0, "torch threads; 0 = torch's default. 1 on a busy shared machine: idle-waiting threads stall there")
    profile: bool = option(False, "also print torch.profiler's top operators of one MSM step and one MoE-layer call")
    tables: bool = option(False, "also time the mask-ratio, MoE token-count and resolution tables (several minutes more)")
    peer: bool = option(False, "also time HF transformers' ViltModel of the same sizes against this project (needs transformers)")
    bf16: str = option("auto", "rows timed in the other dtype (bf16 on CPU): auto = only where a probe finds bf16 fast | on | off")


# ---- the model benchmark: one synthetic batch, one set of weights ------------------------

def make_batch(cfg, batch_size, device):
    """Random images and captions of random length ([CLS] words [SEP], then padding), text masked as for MSM."""
    B, T = batch_size, cfg.max_text_len
    lengths = torch.randint(T // 2, T + 1, (B,))
    text_mask = torch.arange(T)[None] < lengths[:, None]  # (B, T)
    ids = torch.randint(MASK + 1, cfg.vocab_size, (B, T))
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    ids = ids.masked_fill(~text_mask, PAD)
    mlm_ids, mlm_labels = mask_text(ids, {PAD, CLS, SEP, MASK}, MASK, cfg.vocab_size, mask_ratio=0.5)
    batch = dict(image=torch.randn(B, 3, cfg.image_size, cfg.image_size), text_ids=ids, text_mask=text_mask,
                 mlm_ids=mlm_ids, mlm_labels=mlm_labels)
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, opt, batch, task, device, dtype, optimizer_step=True, mask_ratio=None):
    """One training step of `task` on a model shared by both objectives. The other objective's
    heads are frozen as pretrain.py does; they get no gradient, so AdamW leaves them alone.
    mask_ratio: MSM's image mask ratio (default: the config's)."""
    def step():
        model.requires_grad_(True)
        model.freeze_unused_heads(task)
        with training.autocast(device, dtype):
            loss = model(batch, task, mask_ratio)["loss"]
        loss.backward()
        if optimizer_step:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_training(cfg, bo, device, dtype, B, repeats, warmup, other_dtype=True):
    """MSM and ITC+ITM steps, and (other_dtype) the MSM step in the other of fp32/bf16."""
    torch.manual_seed(bo.seed)
    model = EVEWithHeads(cfg).to(device).train()
    opt = make_optimizer(model)
    batch = make_batch(cfg, B, device)
    other = "bf16" if dtype == "fp32" else "fp32"
    steps = {"msm": train_step(model, opt, batch, "msm", device, dtype),
             "itc_itm": train_step(model, opt, batch, "itc_itm", device, dtype)}
    if other_dtype:
        steps[f"msm_{other}"] = train_step(model, opt, batch, "msm", device, other)
    # the FLOPs of one MSM forward+backward, counted once, outside any timing
    flops = count_flops(train_step(model, opt, batch, "msm", device, dtype, optimizer_step=False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps["msm"]()  # the first full step also allocates AdamW's state: its peak is the MSM step's
    peak_mb, peak_kind = peak_memory_mb(device)
    t = time_alternating(steps, repeats, warmup, device, "train steps")
    if bo.profile:
        print_profile(f"one MSM training step ({bo.preset}, batch {B}, {dtype})", steps["msm"], device)
    res = dict(msm_step_s=t["msm"], itc_itm_step_s=t["itc_itm"], msm_vs_itc_itm_speedup=t["itc_itm"] / t["msm"],
               **{f"msm_step_s_{dtype}": t["msm"], f"msm_step_s_{other}": t.get(f"msm_{other}")},
               train_flops=flops, peak_mem_mb=peak_mb, peak_mem_kind=peak_kind)
    if bo.tables:
        fns = {r: train_step(model, opt, batch, "msm", device, dtype, mask_ratio=r) for r in MASK_RATIOS}
        t = time_alternating(fns, repeats, warmup, device, "mask ratios")
        res["mask_ratio_scaling"] = [dict(value=r, step_s=s) for r, s in t.items()]
    return res, batch


def bench_resolution(cfg, bo, device, dtype, B, repeats, warmup):
    """MSM step time at 1x, 1.5x and 2x the image side. One model at a time (a base model and its
    AdamW state take several GB), so these rows are timed one after another, not interleaved."""
    rows = []
    for f in RESOLUTIONS:
        size = round(cfg.image_size * f / cfg.patch_size) * cfg.patch_size
        cfg_r = dataclasses.replace(cfg, image_size=size)
        torch.manual_seed(bo.seed)
        model = EVEWithHeads(cfg_r).to(device).train()
        step = train_step(model, make_optimizer(model), make_batch(cfg_r, B, device), "msm", device, dtype)
        t = time_alternating({size: step}, repeats, warmup, device, f"image size {size}")
        rows.append(dict(value=size, step_s=t[size]))
        del model, step
    return rows


# ---- the MoE layer: sort-based (moe.py), dense equivalent, one-hot einsum dispatch -------

def onehot_moe(moe, x, modality, capacity_factor):
    """GShard/DeepSpeed-style MoE on moe's weights: (N, E, C) one-hot dispatch and combine
    tensors, einsum dispatch, batched expert matmuls, einsum combine. Assignments queue per
    expert first choices first, then in token order, and overflow past C is dropped: the
    same rule as moe.py. Returns (y [N, D], fraction of assignments dropped)."""
    N, D = x.shape
    E, k = moe.num_experts, moe.top_k
    probs = moe.router_logits(x, modality).softmax(dim=-1)  # (N, E) fp32
    top_w, top_e = probs.topk(k, dim=-1)  # (N, k)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    C = math.ceil(capacity_factor * N * k / E)
    # queue position of each assignment: a running count over first choices, then second choices
    chosen = F.one_hot(top_e.t().reshape(-1), E)  # (k*N, E)
    pos = ((chosen.cumsum(0) - 1) * chosen).sum(1).view(k, N)  # (k, N)
    kept = pos < C
    dispatch, combine = 0, 0
    for i in range(k):
        expert_hot = F.one_hot(top_e[:, i], E) * kept[i, :, None]  # (N, E)
        slot_hot = F.one_hot(pos[i].clamp(max=C - 1), C)  # (N, C)
        d = torch.einsum("ne,nc->nec", expert_hot.float(), slot_hot.float())  # (N, E, C)
        dispatch = dispatch + d
        combine = combine + d * top_w[:, i, None, None]
    xe = torch.einsum("nec,nd->ecd", dispatch.to(x.dtype), x)  # (E, C, D) expert inputs
    w1, b1, w2, b2 = (t.to(x.dtype) for t in (moe.w1, moe.b1, moe.w2, moe.b2))
    h = F.gelu(torch.baddbmm(b1.unsqueeze(1), xe, w1))  # (E, C, H)
    out = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, C, D)
    y = torch.einsum("nec,ecd->nd", combine.to(out.dtype), out)  # (N, D)
    return y, 1.0 - kept.float().mean()


def check_onehot(moe, x, modality, capacity_factor):
    """The baseline must compute what moe.py computes with the same capacity (same drops)."""
    ref = copy.deepcopy(moe)
    ref.cfg = dataclasses.replace(ref.cfg, capacity_factor=capacity_factor)
    with torch.no_grad():
        want, _ = ref(x, modality)
        got, dropped = onehot_moe(moe, x, modality, capacity_factor)
    err = (want - got).abs().max().item()
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5), f"one-hot baseline differs from moe.py by {err}"
    return err, dropped.item()


def dense_equivalent(moe):
    """A dense FFN doing a top-k MoE's activated work on every token: hidden k*H, from experts 0..k-1."""
    k = moe.top_k
    w1 = torch.cat(list(moe.w1[:k]), dim=1)  # (D, k*H)
    b1 = moe.b1[:k].reshape(-1)  # (k*H,)
    w2 = torch.cat(list(moe.w2[:k]), dim=0)  # (k*H, D)
    b2 = moe.b2[:k].sum(0)  # (D,)
    return [t.detach().clone().requires_grad_() for t in (w1, b1, w2, b2)]


def dense_ffn(x, w1, b1, w2, b2):
    return torch.addmm(b2, F.gelu(torch.addmm(b1, x, w1)), w2)


def layer_step(forward, x, params, grad_out, device, dtype):
    """Forward and backward of one layer on x with a fixed output gradient."""
    def step():
        for p in params:
            p.grad = None
        with training.autocast(device, dtype):
            y = forward(x)
        y.backward(grad_out.to(y.dtype))
    return step


def bench_moe(cfg, bo, device, dtype, n_tokens, vision_share, repeats, warmup, profile=False):
    """The MoE layer against the dense equivalent and one-hot dispatch on the same n_tokens tokens."""
    hidden = int(cfg.dim * cfg.mlp_ratio)
    N = n_tokens
    n_vis = round(N * vision_share)  # keep the batch's vision/text mix
    modality = torch.cat([torch.zeros(n_vis), torch.ones(N - n_vis)]).long().to(device)
    x = torch.randn(N, cfg.dim, device=device).requires_grad_()  # unit scale, like a LayerNorm output
    grad_out = torch.randn(N, cfg.dim, device=device)
    layers = {}
    for E in (cfg.moe.num_experts, bo.experts):  # the preset's layer, and the one for the one-hot comparison
        torch.manual_seed(bo.seed)
        layers[E] = MoE(cfg.dim, hidden, MoEConfig(num_experts=E, top_k=cfg.moe.top_k)).to(device)
    moe, moe_oh = layers[cfg.moe.num_experts], layers[bo.experts]
    err, dropped = check_onehot(moe_oh, x.detach(), modality, bo.capacity_factor)
    dense = dense_equivalent(moe)
    fns = {"moe": layer_step(lambda t: moe(t, modality)[0], x, [x, *moe.parameters()], grad_out, device, dtype),
           "dense": layer_step(lambda t: dense_ffn(t, *dense), x, [x, *dense], grad_out, device, dtype),
           "onehot": layer_step(lambda t: onehot_moe(moe_oh, t, modality, bo.capacity_factor)[0],
                                x, [x, *moe_oh.parameters()], grad_out, device, dtype)}
    if moe_oh is not moe:
        fns["moe_onehot_experts"] = layer_step(lambda t: moe_oh(t, modality)[0], x, [x, *moe_oh.parameters()],
                                               grad_out, device, dtype)
    t = time_alternating(fns, repeats, warmup, device, f"MoE layer, {N} tokens")
    if profile:
        print_profile(f"the MoE layer, forward and backward ({N} tokens, {dtype})", fns["moe"], device)
    t_sorted = t.get("moe_onehot_experts", t["moe"])
    return dict(moe_tokens=N, moe_vision_tokens=n_vis, moe_experts=cfg.moe.num_experts, top_k=cfg.moe.top_k,
                moe_step_s=t["moe"], dense_equiv_step_s=t["dense"], moe_vs_dense_ratio=t["moe"] / t["dense"],
                onehot_experts=bo.experts, onehot_capacity_factor=bo.capacity_factor, onehot_drop_fraction=dropped,
                onehot_max_abs_err=err, moe_at_onehot_experts_step_s=t_sorted, onehot_step_s=t["onehot"],
                moe_vs_onehot_speedup=t["onehot"] / t_sorted)


def moe_memory_floor(cfg, bandwidth, dtype):
    """Seconds a MoE layer's fwd+bwd spends at least on its expert weights, whatever the token count:
    the forward reads w1 and w2, the backward reads them again and writes their gradients (3 passes),
    for all experts, where the dense equivalent touches top_k experts' worth. Returns (moe_s, dense_s)."""
    weight_bytes = 2 * cfg.dim * int(cfg.dim * cfg.mlp_ratio) * (4 if dtype == "fp32" else 2)  # one expert
    return 3 * cfg.moe.num_experts * weight_bytes / bandwidth, 3 * cfg.moe.top_k * weight_bytes / bandwidth


# ---- the run -------------------------------------------------------------------------------

def run_bench(bo):
    """All benchmarks; returns one flat dict (the JSON)."""
    device = torch.device(bo.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {bo.device} but CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}): drop --device for the CPU")
    if bo.threads:
        torch.set_num_threads(bo.threads)
    dtype = bo.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype not in ("fp32", "bf16"):
        raise SystemExit(f"error: --dtype must be fp32 or bf16, not {dtype!r}")
    B = bo.batch_size or DEFAULT_BATCH.get(bo.preset, 8)
    repeats, warmup = (1, 1) if bo.quick else (bo.repeats, bo.warmup)
    vocab = bo.vocab_size or (1000 if bo.preset == "tiny" else None)
    cfg = make_config(bo.preset, **({"vocab_size": vocab} if vocab else {}))
    if bo.bf16 not in ("auto", "on", "off"):
        raise SystemExit(f"error: --bf16 must be auto, on or off, not {bo.bf16!r}")
    cpu_model, cpu_flags = cpu_info()
    res = dict(preset=bo.preset, device=str(device), dtype=dtype, batch_size=B, repeats=repeats, warmup=warmup,
               threads=torch.get_num_threads(), torch=torch.__version__, load_avg_before=os.getloadavg()[0],
               cpu_model=cpu_model, cpu_bf16_flags=cpu_flags,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)

    # bf16 rows: always when the run is bf16; otherwise only where bf16 matrix math is not much slower than
    # fp32. Emulated bf16 is far slower than that, so the margin of 2x leaves room for a noisy probe
    res["bf16_probe_speedup"] = probe_bf16(device) if bo.bf16 == "auto" and dtype == "fp32" else None
    use_bf16 = dtype == "bf16" or bo.bf16 == "on" or (bo.bf16 == "auto" and res["bf16_probe_speedup"] >= 0.5)
    res["bf16_rows"] = use_bf16
    if not use_bf16:
        why = ("--bf16 off" if bo.bf16 == "off" else
               f"a 512^3 bf16 matmul ran {1 / res['bf16_probe_speedup']:.1f}x SLOWER than fp32 on this CPU "
               f"({cpu_model or 'unknown model'}; bf16 flags: {' '.join(cpu_flags) or 'none'}), so bf16 is emulated")
        print(f"skipping the bf16 rows: {why}", file=sys.stderr)

    if bo.peer:  # first, so that a missing transformers stops the run at once
        res.update(bench_peer(cfg, bo, device, dtype, B, repeats, warmup))
    train, batch = bench_training(cfg, bo, device, dtype, B, repeats, warmup, other_dtype=use_bf16)
    res.update(train)
    # tokens per MoE layer in the MSM pass: [CLS_v] + visible patches, and the real text tokens
    n_vision = B * (1 + int(cfg.num_patches * (1 - cfg.image_mask_ratio)))
    n_text = int(batch["text_mask"].sum())
    share = n_vision / (n_vision + n_text)
    # short calls are noisier, so the layer and matmul timings take 4x the repeats
    res.update(bench_moe(cfg, bo, device, dtype, bo.tokens or n_vision + n_text, share, 4 * repeats, warmup,
                         profile=bo.profile))
    n = bo.matmul_size or (8192 if device.type == "cuda" else 2048)  # a GPU needs large ones to reach its peak
    res.update(bench_matmul(n, 4 * repeats, warmup, device, bf16=use_bf16))
    res.update(bench_memory_bandwidth(4 * repeats, warmup, device))
    res["moe_memory_floor_s"], res["dense_equiv_memory_floor_s"] = moe_memory_floor(
        cfg, res["memory_bandwidth_bytes_per_s"], dtype)
    # the fixed cost above weighs less as a layer gets more tokens (larger batches, more GPUs' worth)
    res["moe_token_scaling"] = [] if not bo.tables else [
        {k: v for k, v in bench_moe(cfg, bo, device, dtype, n, share, repeats, warmup).items()
         if k in ("moe_tokens", "moe_step_s", "dense_equiv_step_s", "moe_vs_dense_ratio", "onehot_step_s",
                  "moe_vs_onehot_speedup")} for n in MOE_TOKENS]

    res["train_flops_per_s"] = res["train_flops"] / res["msm_step_s"]
    res["mfu_fp32"] = res["train_flops"] / res["msm_step_s_fp32"] / res["matmul_peak_flops"]
    res["mfu_bf16"] = res["train_flops"] / res["msm_step_s_bf16"] / res["matmul_peak_flops_bf16"] if use_bf16 else None
    res["mfu"] = res[f"mfu_{dtype}"]
    res["resolution_scaling"] = [] if not bo.tables else bench_resolution(cfg, bo, device, dtype, B, repeats, warmup)
    res.setdefault("mask_ratio_scaling", [])
    return res


def print_report(r):
    ms, G = 1e3, 1e9
    num = lambda v, f, unit="": "skipped" if v is None else format(v, f) + unit  # bf16 rows may be skipped
    print(f"EVE bench: preset {r['preset']}, {r['device']} {r['dtype']}, batch {r['batch_size']}, median of "
          f"{r['repeats']} after {r['warmup']} warm-up, {r['threads']} threads, load average {r['load_avg_before']:.1f}")
    rows = [
        ("MSM step (one pass over the visible tokens)", f"{r['msm_step_s']:.4f} s"),
        ("ITC+ITM step (image, text and 3B fused passes)", f"{r['itc_itm_step_s']:.4f} s"),
        ("  MSM speed-up over ITC+ITM", f"{r['msm_vs_itc_itm_speedup']:.2f}x"),
        (f"MoE layer fwd+bwd, {r['moe_experts']} experts top-{r['top_k']}, {r['moe_tokens']} tokens", f"{r['moe_step_s'] * ms:.2f} ms"),
        ("dense FFN doing the same activated work", f"{r['dense_equiv_step_s'] * ms:.2f} ms"),
        ("  MoE / dense", f"{r['moe_vs_dense_ratio']:.2f}x"),
        (f"MoE layer with {r['onehot_experts']} experts (moe.py, sort-based)", f"{r['moe_at_onehot_experts_step_s'] * ms:.2f} ms"),
        (f"one-hot einsum dispatch, capacity x{r['onehot_capacity_factor']:g}, {r['onehot_drop_fraction']:.1%} dropped",
         f"{r['onehot_step_s'] * ms:.2f} ms"),
        ("  moe.py speed-up over one-hot", f"{r['moe_vs_onehot_speedup']:.2f}x"),
        ("memory bandwidth (copy)", f"{r['memory_bandwidth_bytes_per_s'] / G:.1f} GB/s"),
        ("MoE / dense time floor from weight traffic alone",
         f"{r['moe_memory_floor_s'] * ms:.2f} / {r['dense_equiv_memory_floor_s'] * ms:.2f} ms"),
        (f"matmul {r['matmul_size']}^3 fp32 / bf16", f"{r['matmul_peak_flops'] / G:.0f} / "
         f"{num(r['matmul_peak_flops_bf16'] and r['matmul_peak_flops_bf16'] / G, '.0f')} GFLOP/s"),
        ("MSM step FLOPs (forward + backward), step fp32 / bf16",
         f"{r['train_flops'] / G:.1f} GFLOP, {r['msm_step_s_fp32']:.4f} / {num(r['msm_step_s_bf16'], '.4f')} s"),
        ("MFU fp32 / bf16 (against those matmuls)", f"{r['mfu_fp32']:.3f} / {num(r['mfu_bf16'], '.3f')}"),
        ("CPU (bf16 flags); bf16 probe: bf16 matmul speed-up over fp32",
         f"{r['cpu_model'] or '?'} ({' '.join(r['cpu_bf16_flags']) or 'none'}); "
         f"{num(r['bf16_probe_speedup'], '.2f', 'x')}"),
        (f"peak memory ({r['peak_mem_kind']})", f"{r['peak_mem_mb']:.0f} MiB"),
    ]
    if "vilt_step_s" in r:
        rows = peer_report_rows(r) + rows
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    for i, row in enumerate(r["moe_token_scaling"]):
        if i == 0:
            print(f"\n{'MoE tokens':>16}  {'MoE ms':>8}  {'dense ms':>8}  MoE/dense  {'one-hot ms':>10}  one-hot/MoE")
        print(f"{row['moe_tokens']:>16}  {row['moe_step_s'] * ms:8.1f}  {row['dense_equiv_step_s'] * ms:8.1f}  "
              f"{row['moe_vs_dense_ratio']:8.2f}x  {row['onehot_step_s'] * ms:10.1f}  {row['moe_vs_onehot_speedup']:10.2f}x")
    for key, label in (("mask_ratio_scaling", "image mask ratio"), ("resolution_scaling", "image size")):
        for i, row in enumerate(r[key]):
            if i == 0:
                print(f"\n{label:>16}  MSM step s  vs first row")
            print(f"{row['value']:>16}  {row['step_s']:10.4f}  {row['step_s'] / r[key][0]['step_s']:.2f}x")


def main(argv=None):
    data.use_huge_pages()  # before the first tensor
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_flags(parser, "options", dataclasses.fields(BenchOptions))
    bo = BenchOptions(**vars(parser.parse_args(argv)))
    results = run_bench(bo)
    print_report(results)
    if bo.json:
        with open(bo.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {bo.json}")


if __name__ == "__main__":
    main()
