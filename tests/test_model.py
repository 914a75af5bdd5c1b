import torch
import torch.nn.functional as F

from masking import mask_text
from heads import EVEWithHeads, sample_negatives
from model import EVE, PRESETS, Block, MultiwayFFN, make_config

V = 120  # vocabulary of the toy batches: 0 pad, 1 cls, 2 sep, 3 mask


def toy_batch(B=4, T=12, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 6:] = False  # a padded caption
    ids[0, 6:] = 0
    ids[0, 5] = 2
    mlm_ids, labels = mask_text(ids, {0, 1, 2, 3}, 3, V, 0.5, generator=g)
    img = torch.randn(B, 3, size, size, generator=g)
    return dict(image=img, text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=labels,
                image0=img, image1=img.flip(0), label=torch.tensor([0, 1] * (B // 2)),
                vqa_targets=torch.rand(B, 7, generator=g))


def tiny(num_answers=0, nlvr2_head="", **kw):
    torch.manual_seed(0)
    return EVEWithHeads(make_config("tiny", vocab_size=V, **kw), num_answers=num_answers, nlvr2_head=nlvr2_head)


def test_presets_build_and_count():
    # the paper-sized presets are built on the meta device: shapes and counts, no memory
    counts = {name: cfg.param_counts() for name, cfg in PRESETS.items()}
    for name, (total, active) in counts.items():
        assert 0 < active < total, name
    model = tiny()
    assert counts["tiny"][0] == sum(p.numel() for p in EVE(PRESETS["tiny"]).parameters())
    assert counts["base"][0] > 3 * counts["tiny"][0]
    base = PRESETS["base"]
    assert (base.dim, base.depth, base.heads, base.moe.num_experts, base.moe.top_k) == (768, 12, 12, 32, 2)
    assert base.ffn_kinds()[10:] == ["moe", "moe"] and base.ffn_kinds()[9] == "multiway"
    assert PRESETS["large"].ffn_kinds()[21:] == ["moe"] * 3
    # activated per token, by hand for tiny: every MoE layer idles 6 of 8 experts, every multiway layer one FFN
    D, H = 192, 768
    expert = D * H + H + H * D + D
    assert counts["tiny"][0] - counts["tiny"][1] == 2 * 6 * expert + 4 * expert
    assert "activated per token" in str(PRESETS["tiny"]) and model.cfg.vocab_size == V


def test_three_modes_forward_backward():
    model = tiny(num_answers=7, nlvr2_head="mlp")
    b = toy_batch()
    enc = model.encode(images=b["image"])
    assert enc["hidden"].shape == (4, 65, 192) and enc["n_image"] == 65
    enc = model.encode(text_ids=b["text_ids"], text_mask=b["text_mask"])
    assert enc["hidden"].shape == (4, 12, 192) and enc["n_image"] == 0
    enc = model.encode(b["image"], b["text_ids"], b["text_mask"], mask_ratio=0.75)
    assert enc["hidden"].shape == (4, 1 + 16 + 12, 192) and len(enc["moe"]) == 2
    for task in ["msm", "itc_itm", "mlm", "vqa", "nlvr2"]:
        model.zero_grad()
        out = model(b, task)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), task
        assert model.word_embed.weight.grad is not None, task


def test_visible_patches_equal_full_sequence_without_removed():
    model = tiny().eval()
    b = toy_batch()
    torch.manual_seed(3)
    enc = model.encode(b["image"], b["text_ids"], b["text_mask"], mask_ratio=0.75)
    # reference: embed all patches WITH their positions, drop the removed ones, run the blocks by hand
    x = model.patch_embed(b["image"]).flatten(2).transpose(1, 2) + model.image_pos[:, 1:]
    keep = (enc["mask"] == 0).nonzero()[:, 1].view(4, 16)  # original order
    x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, 192))
    cls = (model.cls_token + model.image_pos[:, :1]).expand(4, -1, -1)
    x = torch.cat([cls, x], 1) + model.type_embed.weight[0]
    x = F.layer_norm(x, (192,), model.embed_norm.weight, model.embed_norm.bias)  # the official embedding norm
    x = torch.cat([x, model.embed_text(b["text_ids"])], 1)
    modality = torch.cat([torch.zeros(4, 17), torch.ones(4, 12)], 1).long()
    valid = torch.cat([torch.ones(4, 17, dtype=torch.bool), b["text_mask"]], 1)
    for blk in model.blocks:
        x, _ = blk(x, modality, valid)
    ref = model.norm(x)
    # the encoder's kept patches come in shuffled order: sort them back to the original order
    order = torch.argsort(enc["ids_restore"], 1)[:, :16]  # ids_keep
    perm = torch.argsort(order, 1)
    got_patches = torch.gather(enc["hidden"][:, 1:17], 1, perm.unsqueeze(-1).expand(-1, -1, 192))
    torch.testing.assert_close(got_patches, ref[:, 1:17], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc["hidden"][:, 17:][b["text_mask"]], ref[:, 17:][b["text_mask"]], atol=1e-5, rtol=1e-5)


def test_image_tokens_are_normalised_like_text_tokens():
    """One embedding LayerNorm over image and text tokens (official EVE): both come out with zero mean and unit
    variance per token at init (LN weight 1, bias 0)."""
    b = toy_batch()
    model = tiny().eval()
    img, _, _ = model.embed_image(b["image"])  # (4, 65, 192)
    txt = model.embed_text(b["text_ids"])
    assert torch.allclose(txt.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(txt.std(-1, unbiased=False), torch.ones(()), atol=1e-2)  # LN eps: slightly below 1
    assert torch.allclose(img.mean(-1), torch.zeros(()), atol=1e-5) and torch.allclose(img.std(-1, unbiased=False), torch.ones(()), atol=1e-2)


def test_padding_does_not_change_real_tokens():
    model = tiny().eval()
    b = toy_batch()
    ids, mask = b["text_ids"][:1, :6], b["text_mask"][:1, :6]
    short = model.encode(b["image"][:1], ids, mask)["hidden"]
    padded = model.encode(b["image"][:1], b["text_ids"][:1], b["text_mask"][:1])["hidden"]
    torch.testing.assert_close(short, padded[:, : short.shape[1]], atol=1e-5, rtol=1e-5)


def test_multiway_gradients_stay_in_their_modality():
    torch.manual_seed(0)
    ffn = MultiwayFFN(8, 16)
    x = torch.randn(10, 8)
    modality = torch.tensor([1] * 10)  # text only
    y, _ = ffn(x, modality)
    y.sum().backward()
    assert all(p.grad.abs().sum() == 0 for p in ffn.ffns[0].parameters())  # defined, and zero
    assert all(p.grad.abs().sum() > 0 for p in ffn.ffns[1].parameters())
    torch.testing.assert_close(y, ffn.ffns[1](x))
    ffn.zero_grad()
    y, _ = ffn(x, torch.tensor([0, 1] * 5))
    y[0::2].sum().backward()  # only the vision tokens' outputs
    assert all(p.grad.abs().sum() == 0 for p in ffn.ffns[1].parameters())


def test_text_tokens_never_reach_vision_ffn_in_model():
    model = tiny(top_ffn="multiway")
    b = toy_batch()
    out = model.encode(text_ids=b["text_ids"], text_mask=b["text_mask"])
    out["hidden"].sum().backward()
    for blk in model.blocks:
        assert blk.ffn.ffns[0].fc1.weight.grad.abs().sum() == 0
        assert blk.ffn.ffns[1].fc1.weight.grad.abs().sum() > 0


def test_hard_negatives_never_pick_the_positive():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g) * 5
    sim.fill_diagonal_(100.0)  # the positive is by far the most similar
    positive = torch.eye(6, dtype=torch.bool)
    positive[0, 1] = positive[1, 0] = True  # two captions of one image
    for _ in range(200):
        idx = sample_negatives(sim, positive, generator=g)
        assert not positive[torch.arange(6), idx].any()


def test_overfit_one_batch():
    model = tiny()
    b = toy_batch(B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    first = None
    for step in range(30):
        out = model(b, "msm")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.5 * first, (first, out["loss"].item())


def test_eval_is_deterministic_and_block_masking_runs():
    model = tiny(router_jitter=0.1, image_masking="block").eval()
    b = toy_batch()
    a = model.encode(b["image"], b["text_ids"], b["text_mask"])["hidden"]
    torch.testing.assert_close(a, model.encode(b["image"], b["text_ids"], b["text_mask"])["hidden"])
    out = model(b, "msm")
    assert out["mask"].sum(1).eq(48).all()


def test_msm_without_image_masking_is_masked_text_with_the_full_image():
    # mask ratio 0: no pixel loss, the decoder is frozen (DDP would otherwise wait for its gradients),
    # and loss_mlm is exactly the MLM loss with the full image
    model = tiny(image_mask_ratio=0.0)
    model.freeze_unused_heads("msm")
    out = model(toy_batch(), "msm")
    assert "loss_mim" not in out and "pred" not in out
    torch.testing.assert_close(out["loss_mlm"], model(toy_batch(), "mlm")["loss_mlm"])
    out["loss"].backward()
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert model.mlm_transform[0].weight.grad is not None


def test_identical_captions_are_not_each_others_negatives(monkeypatch):
    """Two images with the same caption: ITC gives that caption to both images as a positive (soft targets
    1/2, 1/2; checked against the loss written out by hand), and ITM never samples it as a hard negative of
    either image (it would be a label error: the caption is true of both). Padding does not change a text's
    identity. (For ITC alone, soft targets over two identical captions give the same loss as one-hot
    targets: their logits are equal.)"""
    import heads as model_module
    model = tiny().eval()
    with torch.no_grad():  # spread the features, so that the targets matter
        model.itc_image.weight.normal_(0, 1.0)
        model.itc_text.weight.normal_(0, 1.0)
        model.temp.fill_(0.001)  # the features of random inputs differ little at init: magnify the differences
    b = toy_batch()
    ids, mask = b["text_ids"].clone(), b["text_mask"].clone()
    ids[1], mask[1] = ids[0], mask[0]  # pair 1 gets pair 0's (padded) caption
    seen = []
    sample = model_module.sample_negatives
    monkeypatch.setattr(model_module, "sample_negatives", lambda sim, positive: seen.append(positive) or sample(sim, positive))
    got = model.loss_itc_itm(dict(image=b["image"], text_ids=ids, text_mask=mask))[0]["loss_itc"]
    img, txt = model.image_features(b["image"]), model.text_features(ids, mask)
    sim = img @ txt.t() / model.temp  # (4, 4); image i's positives: text i, and text 0 <-> text 1
    targets = torch.eye(4)
    targets[:2, :2] = 0.5
    ref = (-(targets * F.log_softmax(sim, 1)).sum(1).mean() - (targets * F.log_softmax(sim.t(), 1)).sum(1).mean()) / 2
    torch.testing.assert_close(got, ref)
    assert len(seen) == 2 and all(torch.equal(pos, targets > 0) for pos in seen)  # no hard negative among them
    from heads import text_keys
    longer = torch.cat([ids, torch.zeros(4, 3, dtype=ids.dtype)], 1)  # the same texts with more padding
    assert torch.equal(text_keys(ids, mask), text_keys(longer, torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)))
    assert text_keys(ids, mask)[0] == text_keys(ids, mask)[1] != text_keys(ids, mask)[2]


def test_block_without_padding_equals_the_padded_path():
    """A batch with no padding takes the fast path (no attention mask, no gather/scatter of valid tokens);
    the same tokens with one padded position appended take the general path: same outputs and gradients."""
    cfg = make_config("tiny", vocab_size=V)
    for ffn in ("dense", "multiway", "moe"):
        torch.manual_seed(0)
        block = Block(cfg, 32, 4, ffn)
        B, S = 3, 7
        x = torch.randn(B, S, 32)
        modality = torch.cat([torch.zeros(B, 4), torch.ones(B, 3)], 1).long()
        runs = []
        for extra in (0, 1):  # 1: a padded slot after the real tokens
            xi = torch.cat([x, torch.randn(B, extra, 32)], 1).requires_grad_()
            mi = torch.cat([modality, torch.ones(B, extra).long()], 1)
            valid = torch.ones(B, S + extra, dtype=torch.bool)
            valid[:, S:] = False
            block.zero_grad()
            y, _ = block(xi, mi, valid)
            (y[:, :S] * torch.linspace(-1, 1, 32)).sum().backward()
            runs.append([y[:, :S].detach(), xi.grad[:, :S]] + [p.grad.clone() for p in block.parameters()])
        for fast, padded in zip(*runs):
            torch.testing.assert_close(fast, padded, rtol=1e-5, atol=1e-6)


def test_sincos_position_tables_by_hand():
    """MAE's 2D table: channels [0, D/4) sin(row * w_i), [D/4, D/2) cos(row * w_i), then the same for the column,
    w_i = 10000^(-i / (D/4)). The decoder starts from it, the encoder from N(0, 0.02) (official)."""
    from masking import sincos_2d
    import math
    table = sincos_2d(16, 3)  # (9, 16); patch 5 is row 1, column 2
    w = [10000 ** (-i / 4) for i in range(4)]
    expected = [math.sin(1 * x) for x in w] + [math.cos(1 * x) for x in w] + [math.sin(2 * x) for x in w] + [math.cos(2 * x) for x in w]
    torch.testing.assert_close(table[5], torch.tensor(expected))
    default = tiny()
    torch.testing.assert_close(default.decoder.pos_embed[0, 1:], sincos_2d(default.cfg.decoder_dim, 8))
    assert default.image_pos.std() < 0.03  # the official N(0, 0.02) encoder table
    assert default.decoder.pos_embed[0, 0].abs().max() < 0.2  # the decoder's [CLS] keeps a small random row


def test_itc_objective_is_the_contrastive_half_of_itc_itm():
    model = tiny().eval()
    b = toy_batch()
    itc = model(b, "itc")
    both = model(b, "itc_itm")
    torch.testing.assert_close(itc["loss_itc"], both["loss_itc"])
    assert "loss_itm" not in itc and torch.isclose(itc["loss"], itc["loss_itc"] + itc["loss_moe"])
    model.freeze_unused_heads("itc")
    assert not model.itm_head.weight.requires_grad and model.itc_image.weight.requires_grad
