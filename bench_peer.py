"""The peer comparison of bench.py --peer: one training step of HF transformers' ViLT against this
project's encoder of the same sizes on the same tokens, interleaved in one process.

transformers is not a requirement of this project; install it next to your torch to run this:
    python -m venv --system-site-packages peer && peer/bin/pip install transformers
    peer/bin/python bench.py --preset tiny --peer --json out.json   # add --profile for the three steps' profiles
"""
import dataclasses

import torch

import training
from model import EVE
from profiling import MASK, count_flops, make_optimizer, print_profile, time_alternating


def load_vilt():
    """transformers is not a requirement of this project: imported here only, for --peer."""
    try:
        from transformers import ViltConfig, ViltModel
    except ImportError:
        raise SystemExit("error: --peer needs HF transformers, which this project does not require. Install it "
                         "next to this torch, e.g. python -m venv --system-site-packages peer && peer/bin/pip "
                         "install transformers && peer/bin/python bench.py --peer (check it kept your torch)")
    return ViltConfig, ViltModel


def bench_peer(cfg, bo, device, dtype, B, repeats, warmup):
    """One training step of HF ViLT against this project's encoder with dense FFNs in every layer
    and with the preset's own FFNs (multiway + MoE), interleaved, in this process.

    Equal work: the same width, depth, heads, FFN hidden size, image and patch size and text
    length; full-length captions and the full image (no masking), so both run every layer on
    1 + patches image tokens plus max_text_len text tokens per sample. Equal heads: none; the
    loss of each is the same fixed projection of the final (LayerNorm-ed) hidden states, plus the
    MoE's load-balancing loss where there is one; ViLT without its pooler. The same fused AdamW.
    """
    ViltConfig, ViltModel = load_vilt()
    vcfg = ViltConfig(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                      intermediate_size=int(cfg.dim * cfg.mlp_ratio), image_size=cfg.image_size,
                      patch_size=cfg.patch_size, max_position_embeddings=cfg.max_text_len, vocab_size=cfg.vocab_size)
    torch.manual_seed(bo.seed)
    models = {"vilt": ViltModel(vcfg, add_pooling_layer=False),
              "eve_dense": EVE(dataclasses.replace(cfg, ffn="dense", top_ffn="dense")),
              "eve_default": EVE(cfg)}
    T, S = cfg.max_text_len, 1 + cfg.num_patches + cfg.max_text_len  # text tokens, all tokens per sample
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device)
    ids = torch.randint(MASK + 1, cfg.vocab_size, (B, T), device=device)
    text_mask = torch.ones(B, T, dtype=torch.long, device=device)
    pixel_mask = torch.ones(B, cfg.image_size, cfg.image_size, dtype=torch.long, device=device)
    # the shared "head": a fixed projection; (B, S, D), so a model with other token counts fails to broadcast
    target = torch.randn(B, S, cfg.dim, device=device)

    def make_step(name, model):
        model.to(device).train()
        opt = make_optimizer(model)  # parameters that get no gradient (EVE's unused heads) are skipped

        def step():
            with training.autocast(device, dtype):
                if name == "vilt":
                    hidden, extra = model(input_ids=ids, attention_mask=text_mask, pixel_values=images,
                                          pixel_mask=pixel_mask).last_hidden_state, 0.0  # (B, S, D)
                else:
                    enc = model.encode(images, ids, text_mask.bool())
                    hidden, extra = enc["hidden"], model.moe_summary(enc["moe"], 1).get("loss_moe", 0.0)
            loss = (hidden.float() * target).mean() + extra
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    steps = {name: make_step(name, m) for name, m in models.items()}
    flops = {name: count_flops(step) for name, step in steps.items()}  # also the first warm-up call
    t = time_alternating(steps, repeats, warmup, device, "HF ViLT vs EVE")
    if bo.profile:
        for name in ("vilt", "eve_dense", "eve_default"):
            print_profile(f"the peer step {name} ({bo.preset}, batch {B}, {dtype})", steps[name], device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return dict(peer_tokens_per_sample=S, vilt_params=params["vilt"], vilt_flops=flops["vilt"],
                eve_dense_flops=flops["eve_dense"], eve_default_flops=flops["eve_default"], vilt_step_s=t["vilt"],
                eve_dense_step_s=t["eve_dense"], eve_default_step_s=t["eve_default"],
                eve_dense_vs_vilt_speedup=t["vilt"] / t["eve_dense"],
                eve_default_vs_vilt_speedup=t["vilt"] / t["eve_default"])



def peer_report_rows(r):
    """bench.py's report rows of the comparison: (label, value) pairs."""
    G = 1e9
    return [(f"HF ViLT training step ({r['peer_tokens_per_sample']} tokens per sample)",
             f"{r['vilt_step_s']:.4f} s, {r['vilt_flops'] / G:.1f} GFLOP"),
            ("EVE, dense FFNs in every layer, same step", f"{r['eve_dense_step_s']:.4f} s, {r['eve_dense_flops'] / G:.1f} GFLOP"),
            ("EVE, the preset's FFNs (multiway + MoE), same step",
             f"{r['eve_default_step_s']:.4f} s, {r['eve_default_flops'] / G:.1f} GFLOP (top-k experts: more work)"),
            ("  speed-up over ViLT: dense / preset", f"{r['eve_dense_vs_vilt_speedup']:.2f}x / "
             f"{r['eve_default_vs_vilt_speedup']:.2f}x")]
