"""Masking for masked signal modeling: pure functions, no model, no data code.

Images follow MAE: patchify into (N, L, p*p*3), shuffle with per-sample noise, keep the
first L*(1-ratio) tokens; `mask` is 1 where a patch was REMOVED. Text follows BERT: a
ratio of the real tokens (never [CLS]/[SEP]/[PAD]) is masked, labels are -100 where no
loss is taken.
"""
import math

import torch


def patchify(imgs, p):
    """imgs: [N, 3, H, W] -> [N, L, p*p*3], patches in row-major order, pixels (p, q, c)."""
    N, C, H, W = imgs.shape
    assert H % p == 0 and W % p == 0, f"image size {H}x{W} is not divisible by patch size {p}"
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x, p, h=None, channels=3):
    """x: [N, L, p*p*C] -> [N, C, h*p, w*p]; a square grid unless h is given."""
    N, L, _ = x.shape
    h = h or int(math.isqrt(L))
    w = L // h
    assert h * w == L, f"{L} patches do not form a {h}x{w} grid"
    x = x.reshape(N, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, channels, h * p, w * p)


def mask_from_noise(x, noise, num_keep):
    """Keep the num_keep tokens of lowest noise in each row.

    x: [N, L, D], noise: [N, L]. Returns (x_kept [N, num_keep, D], mask [N, L] with
    1 = removed, ids_restore [N, L]) such that gathering [x_kept, removed] with ids_restore
    gives back the original order.
    """
    N, L, D = x.shape
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return x_kept, mask, ids_restore


def random_masking(x, mask_ratio=0.75, generator=None):
    """MAE random masking with per-sample uniform noise. x: [N, L, D]."""
    N, L, _ = x.shape
    num_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device, generator=generator)
    return mask_from_noise(x, noise, num_keep)


def block_masking(x, grid, mask_ratio=0.75, generator=None, min_block=4):
    """BEiT-style block-wise masking on a (h, w) patch grid, for ablations.

    Rectangles of random size and aspect are masked until the target count is reached;
    a random subset of the masked patches then sets the count exactly to
    L - int(L*(1-ratio)), so that every sample keeps the same number of patches.
    """
    N, L, _ = x.shape
    h, w = grid
    num_keep = int(L * (1 - mask_ratio))
    num_mask = L - num_keep
    blocked = torch.zeros(N, h, w)
    for n in range(N):
        while blocked[n].sum() < num_mask:
            area = torch.randint(min_block, max(min_block, num_mask) + 1, (1,), generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(math.log(0.3), math.log(1 / 0.3), generator=generator).item())
            bh = max(1, min(h, round(math.sqrt(area * aspect))))
            bw = max(1, min(w, round(math.sqrt(area / aspect))))
            top = torch.randint(0, h - bh + 1, (1,), generator=generator).item()
            left = torch.randint(0, w - bw + 1, (1,), generator=generator).item()
            blocked[n, top:top + bh, left:left + bw] = 1
    # blocked patches get noise in (1, 2), others in (0, 1): the kept set is drawn from the
    # unblocked patches first; if blocks overshoot, the extra removals come from within them
    noise = torch.rand(N, L, generator=generator) + blocked.reshape(N, L)
    return mask_from_noise(x, noise.to(x.device), num_keep)


def mask_text(input_ids, special_ids, mask_token_id, vocab_size, mask_ratio=0.5,
              bert_replace=False, generator=None):
    """Mask a ratio of the real tokens of each caption.

    input_ids: [N, T] long. special_ids: ids never masked ([CLS], [SEP], [PAD], ...).
    Each caption with at least one real token gets max(1, round(ratio * n_real)) masked
    tokens. With bert_replace, a masked token becomes [MASK] 80%, a random token 10% and
    stays itself 10% of the time (BERT); otherwise always [MASK].
    Returns (masked_ids [N, T], labels [N, T]) with labels -100 where no loss is taken.
    """
    N, T = input_ids.shape
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in special_ids:
        special |= input_ids == s
    real = ~special
    n_real = real.sum(1)  # (N,)
    n_mask = (n_real.float() * mask_ratio).round().long().clamp(min=1) * (n_real > 0)
    # rank the real tokens of each row by random noise; special tokens rank last
    noise = torch.rand(N, T, generator=generator).to(input_ids.device)
    noise = noise.masked_fill(special, 2.0)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (N, T) rank of each position
    chosen = rank < n_mask.unsqueeze(1)
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.clone()
    if not bert_replace:
        return masked.masked_fill(chosen, mask_token_id), labels
    u = torch.rand(N, T, generator=generator).to(input_ids.device)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    masked = masked.masked_fill(to_mask, mask_token_id)
    random_ids = torch.randint(0, vocab_size, (N, T), generator=generator).to(input_ids.device)
    # a random replacement must not produce a special token (it would look like structure)
    for s in special_ids:
        random_ids = torch.where(random_ids == s, torch.full_like(random_ids, mask_token_id), random_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def sincos_2d(dim, side):
    """MAE's fixed 2D sine-cosine position table for a side x side patch grid: [side*side, dim], row-major. Half
    of the channels encode the row, half the column, each as sines and cosines of geometric frequencies."""
    if dim % 4:
        raise ValueError(f"sincos position embeddings need a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")

    def encode(coord):  # (side*side,) -> (side*side, dim/2)
        angles = coord.flatten()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()
