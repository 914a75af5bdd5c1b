"""Official EVE's behaviours as options, checked against independent references, and the name table of
official.py (a state dict with the official names and shapes, made here). CPU, seconds."""
import math
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import official  # noqa: E402
from heads import EVEWithHeads, resize_image_pos  # noqa: E402
from model import EVE, EVEConfig, MultiwayFFN, make_config  # noqa: E402
from moe import ExpertFFN, MoE, MoEConfig, moe_summary, quick_gelu  # noqa: E402

# github ssyze/EVE, read by hand: configs/config_vlmoB_base64k.json (width, heads, layers, MoE layers 10-11, 32
# experts, top-2, quick_gelu, drop_path 0.1), models/multiway_transformer.py (LN eps 1e-6, LayerScale 0.1,
# norm2_imag/norm2_text, LN on the words then pre_layrnorm over all, text dropout 0.1), models/layer.py and
# sharded_moe.py (capacity factor 1.0 train and eval, min capacity 4, renormalised top-2, Gumbel second
# expert, x + modality embedding dispatched, first-choice aux loss), the task models (aux averaged over MoE
# layers, weight 0.001; ITC projections without bias of width hidden_size; ITM head on the text [CLS]).
OFFICIAL_BASE = dict(image_size=224, patch_size=16, dim=768, heads=12, depth=12, mlp_ratio=4.0, ffn="multiway",
                     top_ffn="moe", top_layers=2, num_experts=32, top_k=2, modality_routing=True, max_text_len=40,
                     capacity_factor=1.0, min_capacity=4, renorm_kept=True, sample_second=True,
                     embed_to_experts=True, aux_official=True, aux_weight=0.001, layerscale_init=0.1,
                     drop_path=0.1, act="quick_gelu", ln_eps=1e-6, multiway_norms=True,
                     word_embed_norm=True, text_embed_dropout=0.1, itc_bias=False, itm_pooler=False, itc_dim=768,
                     itc_temp=0.07, router_jitter=0.0, dropout=0.0, pad_text_to=40)
OFFICIAL_LARGE = {**OFFICIAL_BASE, "dim": 1024, "heads": 16, "depth": 24, "top_layers": 3, "itc_dim": 1024}


@pytest.mark.parametrize("preset,want", [("base", OFFICIAL_BASE), ("large", OFFICIAL_LARGE)])
def test_presets_match_the_official_config_field_by_field(preset, want):
    cfg = make_config(preset)
    got = {**asdict(cfg), **asdict(cfg.moe), **asdict(cfg.official)}  # make_config's flat names
    assert {k: got[k] for k in want} == want


def test_tiny_keeps_this_projects_defaults():
    tiny = make_config("tiny")
    defaults = EVEConfig()
    for f in fields(EVEConfig):
        if f.name != "itc_temp":
            assert getattr(tiny, f.name) == getattr(defaults, f.name), f.name
    assert (tiny.moe.capacity_factor, tiny.official.act, tiny.official.multiway_norms, tiny.moe.aux_official) == \
        (0.0, "gelu", False, False)


def test_quick_gelu_formula_and_expert_kernel_gradients():
    x = torch.linspace(-4, 4, 9)
    assert torch.allclose(quick_gelu(x), x / (1 + torch.exp(-1.702 * x)))
    torch.manual_seed(0)
    counts = [3, 0, 2]
    args = [torch.randn(5, 4, dtype=torch.double, requires_grad=True)] + [
        torch.randn(*s, dtype=torch.double, requires_grad=True) for s in ((3, 4, 6), (3, 6), (3, 6, 4), (3, 4))]
    assert torch.autograd.gradcheck(lambda *a: ExpertFFN.apply(*a, counts, "quick_gelu"), args)


def official_moe_by_hand(moe, x, modality, capacity_factor, min_capacity):
    """A token-by-token loop of official EVE's top-2 gating (DeepSpeed top2gating without the Gumbel noise):
    experts see x + modality embedding; capacity max(ceil(2N/E * f), min); first choices fill the experts in
    token order, then second choices; each token's kept probabilities renormalised."""
    N, E = x.shape[0], moe.num_experts
    h = x + moe.modality_embed.weight[modality]
    probs = torch.softmax(h @ moe.gate.weight.t(), -1)
    cap = max(math.ceil(2 * N / E * capacity_factor), min_capacity)
    order = probs.argsort(-1, descending=True)
    used, kept = [0] * E, [[False, False] for _ in range(N)]
    for rank in range(2):
        for n in range(N):
            e = int(order[n, rank])
            if used[e] < cap:
                used[e] += 1
                kept[n][rank] = True
    y = torch.zeros_like(x)
    for n in range(N):
        chosen = [(int(order[n, r]), probs[n, order[n, r]]) for r in range(2) if kept[n][r]]
        total = sum(p for _, p in chosen)
        for e, p in chosen:
            out = quick_gelu(h[n] @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
            y[n] += p / total * out
    first_share = torch.bincount(order[:, 0], minlength=E).float() / N
    aux = E * (probs.mean(0) * first_share).sum()
    return y, aux, sum(not all(k) for k in kept)


@pytest.mark.parametrize("capacity_factor,min_capacity", [(1.0, 4), (0.25, 4), (0.5, 0)])
def test_official_gating_matches_a_token_loop(capacity_factor, min_capacity):
    torch.manual_seed(1)
    moe = MoE(8, 16, MoEConfig(num_experts=4, embed_to_experts=True, capacity_factor=capacity_factor,
                               min_capacity=min_capacity, renorm_kept=True, sample_second=True, aux_official=True),
              act="quick_gelu").eval()
    with torch.no_grad():
        moe.gate.weight.normal_(std=1.0)
        moe.gate.weight[0] = 0.5  # with x around 1, expert 0 is crowded and capacity drops assignments
        moe.b1.normal_(std=0.1)
    x, modality = torch.randn(20, 8) + 1, torch.randint(0, 2, (20,))
    y, stats = moe(x, modality)
    want, aux, dropped = official_moe_by_hand(moe, x, modality, capacity_factor, min_capacity)
    assert dropped > 0
    assert torch.allclose(y, want, atol=1e-5)
    assert torch.allclose(stats["aux_loss"], aux, atol=1e-6)


def official_encoder_by_hand(model, images, text_ids, text_mask, pad_id):
    """Official EVE's MultiwayTransformer (eval, no Gumbel noise) written out, on our model's weights: the text is
    padded to 40 tokens of pad_id; [image tokens, text] is one sequence whose attention ignores padding keys; every
    token, padding too, takes its FFN by position (the last 40 are text) and goes through the MoE, whose gating
    (official_moe_by_hand) runs over all B*S tokens in position order. Returns the final hidden states
    [B, S_image + 40, D], each MoE layer's aux loss and how many tokens capacity cut short."""
    B, T = text_ids.shape
    D, heads = model.cfg.dim, model.cfg.heads
    ids = torch.cat([text_ids, torch.full((B, 40 - T), pad_id)], 1)
    keep = torch.cat([text_mask.bool(), torch.zeros(B, 40 - T, dtype=torch.bool)], 1)
    ln = lambda x, m: F.layer_norm(x, (D,), m.weight, m.bias, 1e-6)  # noqa: E731
    mlp = lambda x, f: quick_gelu(x @ f.fc1.weight.t() + f.fc1.bias) @ f.fc2.weight.t() + f.fc2.bias  # noqa: E731
    x = ln(model.word_embed.weight[ids], model.word_norm) + model.text_pos.weight[:40] + model.type_embed.weight[1]
    if images is not None:
        p = model.cfg.patch_size
        patches = F.conv2d(images, model.patch_embed.weight, model.patch_embed.bias, stride=p).flatten(2).transpose(1, 2)
        vision = torch.cat([model.cls_token.expand(B, 1, D), patches], 1) + model.image_pos[0] + model.type_embed.weight[0]
        x, keep = torch.cat([vision, x], 1), torch.cat([torch.ones(B, vision.shape[1], dtype=torch.bool), keep], 1)
    x = ln(x, model.embed_norm)
    S = x.shape[1]
    modality = (torch.arange(S) >= S - 40).long().repeat(B)  # (B*S,) by position: 0 vision, 1 text
    aux, short = [], 0
    for blk in model.blocks:
        q, k, v = (ln(x, blk.norm1) @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).view(B, S, 3, heads, -1).unbind(2)
        scores = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(D // heads)
        att = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
        x = x + blk.gamma1 * blk.attn.proj(torch.einsum("bhqk,bkhc->bqhc", att, v).reshape(B, S, D))
        if isinstance(blk.ffn, MoE):
            y, a, cut = official_moe_by_hand(blk.ffn, ln(x, blk.norm2).reshape(B * S, D), modality, 1.0, 4)
            y, aux, short = y.view(B, S, D), aux + [a], short + cut
        else:
            (nv, nt), (fv, ft) = blk.ffn.norms, blk.ffn.ffns
            y = torch.cat([mlp(ln(x[:, :S - 40], nv), fv), mlp(ln(x[:, S - 40:], nt), ft)], 1)
        x = x + blk.gamma2 * y
    return ln(x, model.norm), aux, short


def randomised_official_model(**overrides):
    """A small EVE with every official choice (the base preset's), all weights random and large enough that
    routing is uneven (capacity cuts) and LayerNorms, LayerScale and biases matter; the key bias zero, as
    official.py writes it."""
    torch.manual_seed(0)
    cfg = make_config("base", image_size=32, patch_size=8, dim=32, depth=3, heads=2, top_layers=2, num_experts=4,
                      vocab_size=50, pad_id=1, decoder_dim=16, decoder_depth=1, decoder_heads=2, itc_dim=16, **overrides)
    model = EVE(cfg).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            mean = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            t.copy_(torch.randn_like(t) * (0.3 if t.dim() > 1 else 0.2) + mean)
        for blk in model.blocks:
            blk.attn.qkv.bias.view(3, -1)[1] = 0
    return model


@pytest.mark.parametrize("with_images", [True, False])  # a VQA / ITM pass, and retrieval's text-only pass
def test_official_padding_matches_the_official_forward(with_images):
    model = randomised_official_model()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 13, 7, 9])
    text_mask = torch.arange(13) < lengths[:, None]  # padded to the longest, as data.Collator does
    text_ids = torch.randint(5, 50, (4, 13), generator=g).masked_fill(~text_mask, 1)
    images = torch.randn(4, 3, 32, 32, generator=g) if with_images else None
    want, aux, short = official_encoder_by_hand(model, images, text_ids, text_mask, pad_id=1)
    assert short > 0  # capacity (official factor 1.0, counted over padding too) cuts some tokens short
    with torch.no_grad():
        enc = model.encode(images, text_ids, text_mask)
    got = enc["hidden"]  # (B, S_image + 13, D): the caller's positions
    assert torch.allclose(got, want[:, :got.shape[1]], atol=1e-5), (got - want[:, :got.shape[1]]).abs().max()
    assert torch.allclose(torch.stack([s["aux_loss"] for s in enc["moe"]]), torch.stack(aux), atol=1e-5)
    assert enc["moe"][0]["first_expert"].shape == (int(text_mask.sum()) + 4 * enc["n_image"],)  # real tokens only
    # padding kept out of the FFNs (this project's default): the real tokens come out otherwise
    ours = EVE(make_config(model.cfg, pad_text_to=0)).eval()
    ours.load_state_dict(model.state_dict())
    with torch.no_grad():
        apart = ours.encode(images, text_ids, text_mask)["hidden"]
    real = torch.cat([torch.ones(4, enc["n_image"], dtype=torch.bool), text_mask], 1)
    assert (apart - want[:, :got.shape[1]])[real].abs().max() > 0.05


def test_official_padding_needs_the_text_positions():
    with pytest.raises(ValueError, match="pad_text_to=40 exceeds max_text_len=32"):
        EVE(make_config("tiny", pad_text_to=40, vocab_size=50))


def test_gumbel_second_expert_in_training_only():
    torch.manual_seed(0)
    moe = MoE(4, 8, MoEConfig(num_experts=4, sample_second=True, modality_routing=False))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    N = 20000
    probs = logits.softmax(-1)[0]
    _, top_e = moe.choose(logits.expand(N, -1), probs.expand(N, -1))  # training: sampled
    assert (top_e[:, 0] == 0).all()
    share = torch.bincount(top_e[:, 1], minlength=4).float() / N
    want = probs.clone()
    want[0] = 0
    want /= want.sum()  # Gumbel-max: P(second = j) = p_j / (1 - p_first)
    assert torch.allclose(share, want, atol=0.015)
    moe.eval()
    _, top_e = moe.choose(logits.expand(N, -1), probs.expand(N, -1))
    assert (top_e[:, 1] == 1).all()  # evaluation: deterministic top-2


def test_per_modality_norms():
    torch.manual_seed(0)
    ffn = MultiwayFFN(8, 16, act="quick_gelu", norm_eps=1e-6)
    with torch.no_grad():
        for norm in ffn.norms:
            norm.weight.normal_(1, 0.3)
            norm.bias.normal_(0, 0.3)
    x, modality = torch.randn(10, 8), torch.tensor([0, 1] * 5)
    y, _ = ffn(x, modality)
    for n in range(10):
        m = int(modality[n])
        normed = F.layer_norm(x[n], (8,), ffn.norms[m].weight, ffn.norms[m].bias, 1e-6)
        mlp = ffn.ffns[m]
        want = mlp.fc2(quick_gelu(mlp.fc1(normed)))
        assert torch.allclose(y[n], want, atol=1e-6)
    block = EVE(make_config("tiny", multiway_norms=True, depth=2, top_layers=1, vocab_size=50)).blocks[0]
    assert isinstance(block.norm2, torch.nn.Identity) and block.ffn.norms is not None


def test_key_bias_gets_no_gradient():
    """Why there is no 'q and v biases only' switch: a key bias adds q.b_k to every key's score of a query, which
    the softmax removes, so its gradient is zero and it stays at its zero init; official.py writes [q, 0, v]."""
    torch.manual_seed(0)
    block = EVE(make_config("tiny", depth=1, top_layers=0, vocab_size=50)).blocks[0]
    x = torch.randn(2, 7, 192)
    block.attn(x, None).pow(2).sum().backward()
    g = block.attn.qkv.bias.grad.view(3, -1).abs().max(1).values
    assert g[1] < 1e-6 < g[0] and g[2] > 1e-6


def test_official_text_embedding_and_itm_itc_options():
    torch.manual_seed(0)
    cfg = make_config("tiny", word_embed_norm=True, ln_eps=1e-6, itc_bias=False, itm_pooler=False, vocab_size=50)
    model = EVEWithHeads(cfg).eval()
    with torch.no_grad():
        model.word_norm.weight.normal_(1, 0.3)
    ids = torch.randint(0, 50, (2, 6))
    words = F.layer_norm(model.word_embed(ids), (192,), model.word_norm.weight, model.word_norm.bias, 1e-6)
    want = F.layer_norm(words + model.text_pos.weight[:6] + model.type_embed.weight[1], (192,),
                        model.embed_norm.weight, model.embed_norm.bias, 1e-6)
    assert torch.allclose(model.embed_text(ids), want, atol=1e-5)
    assert model.itc_image.bias is None and model.itc_text.bias is None
    images, mask = torch.randn(2, 3, 64, 64), torch.ones(2, 6, dtype=torch.long)
    logits, _ = model.itm_logits(images, ids, mask)
    cls, _ = model.fused_cls(images, ids, mask)
    assert torch.allclose(logits, model.itm_head(cls))


def test_official_aux_loss_is_averaged_over_moe_layers():
    stats = [{"aux_loss": torch.tensor(v), "z_loss": torch.tensor(0.0), "tokens_per_expert": torch.zeros(2, 8),
              "drop_fraction": torch.tensor(0.0)} for v in (1.0, 3.0)]
    for official_aux, want in ((False, 4.0), (True, 2.0)):
        cfg = make_config("tiny", aux_official=official_aux, vocab_size=50)
        assert moe_summary(stats, 1, cfg.moe)["loss_moe"].item() == pytest.approx(0.001 * want)


def test_position_embedding_resize_keeps_cls_and_is_bicubic():
    pos = torch.randn(1, 1 + 16, 3)
    out = resize_image_pos(pos, 6)
    assert out.shape == (1, 37, 3) and torch.equal(out[:, 0], pos[:, 0])
    grid = pos[0, 1:].t().reshape(1, 3, 4, 4)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(3, 36).t()
    assert torch.allclose(out[0, 1:], want)
    assert resize_image_pos(pos, 4) is pos


# ---- the name table -----------------------------------------------------------------------------------------

def official_state_dict(D=32, depth=3, moe_layers=(2,), E=4, vocab=50, grid=4, patch=8, text=196, answers=7):
    """Random tensors under official EVE's names and shapes (MultiwayTransformer under backbone., a VQA head)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"backbone.patch_embed.weight": r(D, 3, patch, patch), "backbone.patch_embed.bias": r(D),
          "backbone.class_embedding_vision": r(D), "backbone.type_embed_vision": r(D), "backbone.type_embed_text": r(D),
          "backbone.pos_embed_vision": r(1 + grid * grid, D), "backbone.position_ids_vision": torch.arange(17)[None],
          "backbone.word_embedding.weight": r(vocab, D), "backbone.layer_norm_text.weight": r(D),
          "backbone.layer_norm_text.bias": r(D), "backbone.pos_embed_text": r(text, D),
          "backbone.position_ids_text": torch.arange(text), "backbone.pre_layrnorm.weight": r(D),
          "backbone.pre_layrnorm.bias": r(D), "backbone.norm.weight": r(D), "backbone.norm.bias": r(D),
          "output.0.weight": r(2 * D, D), "output.0.bias": r(2 * D), "output.1.weight": r(2 * D),
          "output.1.bias": r(2 * D), "output.3.weight": r(answers, 2 * D), "output.3.bias": r(answers)}
    for i in range(depth):
        p = f"backbone.encoder.layers.{i}."
        sd.update({p + "norm1.weight": r(D), p + "norm1.bias": r(D), p + "attn.qkv.weight": r(3 * D, D),
                   p + "attn.q_bias": r(D), p + "attn.v_bias": r(D), p + "attn.proj.weight": r(D, D),
                   p + "attn.proj.bias": r(D), p + "gamma_1": r(D), p + "gamma_2": r(D)})
        if i in moe_layers:
            sd.update({p + "norm2_vl.weight": r(D), p + "norm2_vl.bias": r(D), p + "mlp_moe.moe.gate.wg.weight": r(E, D),
                       p + "mlp_moe.moe.vision_embed": r(D), p + "mlp_moe.moe.text_embed": r(D)})
            for e in range(E):
                q = p + f"mlp_moe.moe.experts.experts.{e}."
                sd.update({q + "fc1.weight": r(4 * D, D), q + "fc1.bias": r(4 * D), q + "fc2.weight": r(D, 4 * D),
                           q + "fc2.bias": r(D)})
        else:
            for m in ("imag", "text"):
                sd.update({p + f"norm2_{m}.weight": r(D), p + f"norm2_{m}.bias": r(D),
                           p + f"mlp_{m}.fc1.weight": r(4 * D, D), p + f"mlp_{m}.fc1.bias": r(4 * D),
                           p + f"mlp_{m}.fc2.weight": r(D, 4 * D), p + f"mlp_{m}.fc2.bias": r(D)})
    return sd


def test_every_official_tensor_maps_to_its_place():
    sd = official_state_dict()
    cfg = official.official_config(sd, heads=4)
    assert (cfg.dim, cfg.depth, cfg.top_layers, cfg.moe.num_experts, cfg.vocab_size, cfg.image_size) == (32, 3, 1, 4, 50, 32)
    model = EVEWithHeads(cfg, num_answers=7)
    state = official.convert(sd, model, verbose=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert {k.split(".")[0] for k in missing} <= {"decoder", "mlm_transform", "mlm_bias", "itc_image", "itc_text", "temp", "itm_head"}
    p, b = "backbone.encoder.layers.", model.blocks
    assert torch.equal(b[2].ffn.w1[3], sd[p + "2.mlp_moe.moe.experts.experts.3.fc1.weight"].t())
    assert torch.equal(b[2].ffn.w2[1], sd[p + "2.mlp_moe.moe.experts.experts.1.fc2.weight"].t())
    assert torch.equal(b[2].ffn.modality_embed.weight[1], sd[p + "2.mlp_moe.moe.text_embed"])
    bias = b[0].attn.qkv.bias.view(3, -1)
    assert torch.equal(bias[0], sd[p + "0.attn.q_bias"]) and torch.equal(bias[2], sd[p + "0.attn.v_bias"])
    assert not bias[1].any()
    assert torch.equal(b[1].ffn.norms[1].weight, sd[p + "1.norm2_text.weight"])
    assert torch.equal(model.type_embed.weight[0], sd["backbone.type_embed_vision"])
    assert torch.equal(model.text_pos.weight, sd["backbone.pos_embed_text"][:40])
    assert torch.equal(model.vqa_head[3].weight, sd["output.3.weight"])
    # another resolution: the position embeddings are resized, the rest is the same
    big = EVEWithHeads(official.official_config(sd, heads=4, image_size=48), num_answers=7)
    assert official.convert(sd, big, verbose=False)["image_pos"].shape == (1, 37, 32)


def test_a_wrong_or_missing_name_is_listed():
    sd = official_state_dict()
    sd["backbone.encoder.layers.1.attn.qkv_typo.weight"] = sd.pop("backbone.encoder.layers.1.attn.qkv.weight")
    model = EVEWithHeads(official.official_config(sd, heads=4))
    with pytest.raises(SystemExit) as e:
        official.convert(sd, model, verbose=False)
    msg = str(e.value)
    assert "backbone.encoder.layers.1.attn.qkv_typo.weight" in msg and "blocks.1.attn.qkv.weight" in msg
    sd = official_state_dict()
    del sd["backbone.encoder.layers.2.mlp_moe.moe.experts.experts.2.fc1.bias"]
    with pytest.raises(SystemExit, match=r"blocks\.2\.ffn\.b1"):
        official.convert(sd, EVEWithHeads(official.official_config(sd, heads=4)), verbose=False)


def test_finetune_init_from_an_official_checkpoint(small_world, tmp_path, capsys):
    import json

    import finetune
    import tokenization
    bpe = tmp_path / "bpe"  # a byte-level BPE without merges: the specials and the 256 byte characters
    bpe.mkdir()
    vocab = list(tokenization.BPE_SPECIALS.values()) + list(tokenization.byte_to_char().values())
    (bpe / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (bpe / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    sd = official_state_dict(D=64, vocab=300)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "eve_official.pth")
    w = small_world
    args = ["--task", "vqa", "--image-root", w["root"], "--answer-list", w["answer_list"], "--batch-size", "4",
            "--num-workers", "0", "--max-steps", "1", "--min-answer-count", "1", "--out-dir", tmp_path / "ft",
            "--init", tmp_path / "eve_official.pth"] + [
        x for split in ("train", "val", "test") for x in (f"--{split}-json", w[f"vqa_{split}"])]
    args = [str(a) for a in args]
    with pytest.raises(SystemExit, match="--bpe"):
        finetune.main(args)
    finetune.main(args + ["--bpe", str(bpe), "--image-size", "48"])  # 6 x 6 patches: position embeddings resized
    printed = capsys.readouterr().out
    assert "official heads not used here" in printed and "output.3.weight (7, 128)" in printed  # another answer list
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert best["config"]["official"]["act"] == "quick_gelu" and best["config"]["dim"] == 64 and best["config"]["image_size"] == 48
    # the official padding: 40 tokens of the tokenizer's own pad id
    assert best["config"]["official"]["pad_text_to"] == 40 and best["config"]["pad_id"] == vocab.index("<pad>")
    # one fine-tuning step away from the official weights (Adam moves each by about lr)
    assert torch.allclose(best["model"]["blocks.2.ffn.gate.weight"], sd["backbone.encoder.layers.2.mlp_moe.moe.gate.wg.weight"],
                          atol=5e-3)
