import torch

from masking import block_masking, mask_from_noise, mask_text, patchify, random_masking, unpatchify


def test_patchify_round_trip_and_layout():
    imgs = torch.randn(2, 3, 32, 48)
    x = patchify(imgs, 8)
    assert x.shape == (2, 4 * 6, 8 * 8 * 3)
    # patch (row 1, col 2) holds pixels [8:16, 16:24], laid out (p, q, c)
    ref = imgs[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(x[0, 1 * 6 + 2], ref)
    torch.testing.assert_close(unpatchify(x, 8, h=4), imgs)


def test_random_masking_counts_and_restore():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 5)
    kept, mask, ids_restore = random_masking(x, 0.75)
    assert kept.shape == (4, 16, 5)
    assert (mask.sum(1) == 48).all() and set(mask.unique().tolist()) == {0.0, 1.0}
    # put the kept tokens back (removed ones as zeros) and compare with x where mask == 0
    full = torch.cat([kept, torch.zeros(4, 48, 5)], 1)
    restored = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    torch.testing.assert_close(restored, x * (1 - mask).unsqueeze(-1))
    # per-sample noise: different samples keep different patches
    assert not torch.equal(mask[0], mask[1])


def test_mask_from_noise_keeps_lowest_noise():
    x = torch.arange(6.0).view(1, 6, 1)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2]])
    kept, mask, _ = mask_from_noise(x, noise, 3)
    assert kept.flatten().tolist() == [1.0, 5.0, 3.0]
    assert mask.flatten().tolist() == [1, 0, 1, 0, 1, 0]


def test_block_masking_exact_count_and_contiguity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 2)
    kept, mask, ids_restore = block_masking(x, (8, 8), 0.5, generator=g)
    assert kept.shape == (3, 32, 2) and (mask.sum(1) == 32).all()
    # blocks: most masked patches have a masked 4-neighbour (random masking would give ~50%)
    m = mask.view(3, 8, 8)
    nb = torch.zeros_like(m)
    nb[:, 1:] += m[:, :-1]; nb[:, :-1] += m[:, 1:]; nb[:, :, 1:] += m[:, :, :-1]; nb[:, :, :-1] += m[:, :, 1:]
    assert ((nb > 0) & (m > 0)).sum() / m.sum() > 0.9


PAD, CLS, SEP, MASK = 0, 1, 2, 3


def _captions():
    ids = torch.tensor([
        [CLS, 10, 11, 12, 13, 14, 15, SEP],
        [CLS, 20, SEP, PAD, PAD, PAD, PAD, PAD],
        [CLS, SEP, PAD, PAD, PAD, PAD, PAD, PAD],  # empty caption
    ])
    return ids


def test_mask_text_ratio_specials_and_labels():
    ids = _captions()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        masked, labels = mask_text(ids, {PAD, CLS, SEP, MASK}, MASK, 100, mask_ratio=0.5, generator=g)
        chosen = labels != -100
        assert chosen[0].sum() == 3  # round(0.5 * 6)
        assert chosen[1].sum() == 1  # at least one per non-empty caption
        assert chosen[2].sum() == 0  # nothing to mask
        special = (ids == PAD) | (ids == CLS) | (ids == SEP)
        assert not (chosen & special).any()
        assert torch.equal(labels[chosen], ids[chosen])
        assert (masked[chosen] == MASK).all() and torch.equal(masked[~chosen], ids[~chosen])


def test_mask_text_bert_replacement_shares():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 50))
    masked, labels = mask_text(ids, {PAD, CLS, SEP, MASK}, MASK, 1000, mask_ratio=0.5, bert_replace=True, generator=g)
    chosen = labels != -100
    n = chosen.sum().item()
    as_mask = ((masked == MASK) & chosen).sum().item() / n
    same = ((masked == ids) & chosen).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02 and abs(same - 0.1) < 0.02  # the rest (~10%) are random tokens
    assert not ((masked == PAD) | (masked == CLS) | (masked == SEP)).any()
