"""
Modality-aware mixture of experts (EVE, arXiv 2308.11971, Sec. 3.2).

EVE replaces the feed-forward layer of some shared Transformer blocks with a
sparse MoE. Image patches and words go through the same experts, but the router
is told each token's modality: a learned modality embedding is added to the
router's input (never to the expert input), so vision and text tokens can be
sent to different experts from the first step on.

Dispatch is sort-based, in the spirit of HF Mixtral's sparse block: the N*k
token->expert assignments are sorted by expert, each expert runs once on its
contiguous slice, and the weighted results are added back with index_add_.
There are no (tokens x experts x capacity) one-hot tensors.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def load_balancing_loss(router_probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard auxiliary loss: E * sum_e f_e * P_e, 1.0 at uniform routing.

    router_probs: [N, E] float32 softmax; expert_index: [N, k] chosen experts.
    f_e (fraction of the N*k assignments sent to e) is a count and carries no
    gradient; the gradient reaches the router through P_e (its mean probability).
    """
    counts = torch.bincount(expert_index.flatten(), minlength=num_experts)  # (E,)
    f = counts.float() / expert_index.numel()
    p = router_probs.float().mean(dim=0)  # (E,)
    return num_experts * (f * p).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE z-loss: keeps router logits small so the fp32 softmax stays well conditioned."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class MoE(nn.Module):
    """Top-k routed two-layer GELU experts, stored stacked as one set of parameters.

    capacity_factor <= 0 is dropless; otherwise each expert keeps at most
    ceil(capacity_factor * N * k / E) assignments, first choices before second
    choices, then token order, and the overflow is dropped (the caller's
    residual connection carries a token whose assignments are all dropped).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int = 2, num_modalities: int = 2,
                 modality_routing: bool = True, capacity_factor: float = 0.0, router_jitter: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        assert 1 <= top_k <= num_experts, f"top_k={top_k} must be in [1, num_experts={num_experts}]"
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.num_modalities = num_modalities
        self.capacity_factor = capacity_factor
        self.router_jitter = router_jitter
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # added to the router input only; small random init so modalities route apart from step 0
        self.modality_embed = nn.Embedding(num_modalities, dim) if modality_routing else None
        # one stacked tensor per layer: a single parameter for DDP/optimizers, and bench.py reads them
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # (E, D, H)
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # (E, H, D)
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))  # (E, D)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        # ViT/BEiT-style init; the gate keeps nn.Linear's default
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        if self.modality_embed is not None:
            nn.init.normal_(self.modality_embed.weight, std=0.02)

    def _ffn(self, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        # addmm is on autocast's low-precision list, so under autocast this runs in bf16
        h = F.gelu(torch.addmm(b1, x, w1))  # (n, H)
        return self.dropout(torch.addmm(b2, h, w2))  # (n, D)

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e alone on x: [n, D] -> [n, D]; the reference for tests and bench.py."""
        p = [t[e].to(x.dtype) for t in (self.w1, self.b1, self.w2, self.b2)]
        return self._ffn(x, *p)

    def router_logits(self, x: Tensor, modality: Tensor) -> Tensor:
        """Router logits [N, E], always float32 (the softmax and top-k are precision sensitive)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()  # (N, D)
            if self.modality_embed is not None:
                h = h + self.modality_embed(modality).float()
            if self.training and self.router_jitter > 0:
                # multiplicative noise (Switch) for exploration; eval stays deterministic
                eps = self.router_jitter
                h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
            return F.linear(h, self.gate.weight.float())  # (N, E)

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, dict]:
        """x: [N, D] tokens (padding already removed); modality: [N] long, 0 = vision, 1 = text.

        Returns y: [N, D] and a dict of stats: aux_loss, z_loss, tokens_per_expert [M, E], drop_fraction.
        """
        N, D = x.shape
        E, k, M = self.num_experts, self.top_k, self.num_modalities

        # route: fp32 softmax, top-k, renormalise so each token's k weights sum to 1
        logits = self.router_logits(x, modality)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        top_w, top_e = probs.topk(k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        # flatten rank-major (all first choices, then all second choices, each in token order);
        # a stable sort by expert keeps that order inside each expert, which is the capacity priority
        flat_e = top_e.t().reshape(-1)  # (k*N,)
        flat_w = top_w.t().reshape(-1)  # (k*N,)
        flat_tok = torch.arange(N, device=x.device).repeat(k)  # (k*N,)
        order = torch.argsort(flat_e, stable=True)
        e_sorted, tok_sorted, w_sorted = flat_e[order], flat_tok[order], flat_w[order]
        counts = torch.bincount(flat_e, minlength=E)  # (E,)

        A = k * N
        cap = math.ceil(self.capacity_factor * A / E) if self.capacity_factor > 0 else A
        # the one host sync: slice boundaries must be Python ints
        counts_l = counts.tolist()
        starts_l = [0]
        for c in counts_l[:-1]:
            starts_l.append(starts_l[-1] + c)

        # unbind once so the backward is a single stack (idle experts get zero grads, no per-expert
        # full-size select-backward); every expert runs, possibly on an empty slice, so all
        # parameters are in the graph under DDP
        w1s, b1s, w2s, b2s = (t.to(x.dtype).unbind(0) for t in (self.w1, self.b1, self.w2, self.b2))
        x_sorted = x[tok_sorted]  # (k*N, D) token copies grouped by expert
        outs, toks, ws = [], [], []
        for e in range(E):
            s = starts_l[e]
            seg = slice(s, s + min(counts_l[e], cap))  # kept = the first `cap` of the expert's slice
            outs.append(self._ffn(x_sorted[seg], w1s[e], b1s[e], w2s[e], b2s[e]))
            toks.append(tok_sorted[seg])
            ws.append(w_sorted[seg])
        out = torch.cat(outs)  # (A_kept, D)
        w = torch.cat(ws).to(out.dtype).unsqueeze(1)  # (A_kept, 1)
        # no renormalisation after drops: a dropped assignment simply contributes nothing
        y = x.new_zeros(N, D).index_add_(0, torch.cat(toks), (out * w).to(x.dtype))  # (N, D)

        stats = self._stats(probs, top_e, logits, modality, e_sorted, tok_sorted, counts, cap)
        return y, stats

    def _stats(self, probs, top_e, logits, modality, e_sorted, tok_sorted, counts, cap) -> dict:
        E, M = self.num_experts, self.num_modalities
        A = e_sorted.numel()
        # position of each sorted assignment inside its expert's slice; the first `cap` are kept
        starts = counts.cumsum(0) - counts  # (E,)
        pos = torch.arange(A, device=e_sorted.device) - starts[e_sorted]  # (A,)
        kept = pos < cap
        # bin = modality * E + expert; dropped assignments go to an extra bin that is cut off
        bins = modality[tok_sorted] * E + e_sorted
        bins = bins.masked_fill(~kept, M * E)
        tokens_per_expert = torch.bincount(bins, minlength=M * E + 1)[: M * E].view(M, E)
        drop_fraction = 1.0 - tokens_per_expert.sum().float() / max(A, 1)
        return {
            'aux_loss': load_balancing_loss(probs, top_e, E),
            'z_loss': router_z_loss(logits),
            'tokens_per_expert': tokens_per_expert,
            'drop_fraction': drop_fraction,
        }
