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

Reading order: the activations and auxiliary losses, then the MoE module (router, top-k,
dispatch, combine); at the end ExpertFFN, the CPU-friendly kernel that runs all experts, and
its helpers.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x): official EVE's expert and FFN activation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


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


@dataclass
class MoEConfig:
    """The options of a modality-aware MoE layer; EVEConfig carries one and Block passes it whole to MoE."""
    num_experts: int = 8  # experts per MoE layer
    top_k: int = 2  # experts per token
    modality_routing: bool = True  # the router is told each token's modality (EVE's modality-aware routing)
    capacity_factor: float = 0.0  # expert capacity as a multiple of the fair share; 0 = dropless
    min_capacity: int = 0  # with capacity_factor > 0, each expert keeps at least this many assignments
    router_jitter: float = 0.0  # multiplicative router-input noise, training only
    aux_weight: float = 0.001  # load-balancing loss weight (official EVE's value)
    z_weight: float = 0.0  # router z-loss weight
    # official EVE's gating (DeepSpeed's top2gating); OFFICIAL_GATING switches all four on, each is a switch alone
    renorm_kept: bool = False  # a token's top-k weights renormalised over the assignments capacity kept
    sample_second: bool = False  # in training, the experts after the first are drawn by Gumbel-max from the logits
    embed_to_experts: bool = False  # the experts get x + modality embedding (the router's input), not x
    aux_official: bool = False  # load-balancing loss of first choices only, averaged (not summed) over MoE layers


OFFICIAL_GATING = dict(capacity_factor=1.0, min_capacity=4, renorm_kept=True, sample_second=True,
                       embed_to_experts=True, aux_official=True)


def moe_summary(stats, passes, cfg: MoEConfig) -> dict:
    """The MoE part of a task's losses, from the stats of every MoE layer of `passes` encoder passes: the
    auxiliary loss averaged over passes (and, official, over layers), the per-layer expert load summed."""
    if not stats:
        return {}
    n_layers = len(stats) // passes
    aux = sum(s["aux_loss"] for s in stats) / passes  # summed over layers
    if cfg.aux_official:
        aux = aux / n_layers  # official EVE averages over its MoE layers
    z = sum(s["z_loss"] for s in stats) / passes
    load = [sum(s["tokens_per_expert"] for s in stats[i::n_layers]) for i in range(n_layers)]
    return {"loss_moe": cfg.aux_weight * aux + cfg.z_weight * z,
            "moe_aux": aux.detach() / n_layers, "moe_load": load,  # load[i]: (modalities, experts)
            "moe_drop": sum(s["drop_fraction"] for s in stats).detach() / len(stats)}


class MoE(nn.Module):
    """Top-k routed two-layer experts (GELU or quick GELU), stored stacked as one set of parameters.

    capacity_factor <= 0 is dropless; otherwise each expert keeps at most
    max(ceil(capacity_factor * N * k / E), min_capacity) assignments, first choices before second
    choices, then token order, and the overflow is dropped (the caller's
    residual connection carries a token whose assignments are all dropped).
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig | None = None, num_modalities: int = 2,
                 dropout: float = 0.0, act: str = "gelu"):
        super().__init__()
        cfg = cfg or MoEConfig()
        assert 1 <= cfg.top_k <= cfg.num_experts, f"top_k={cfg.top_k} must be in [1, num_experts={cfg.num_experts}]"
        self.cfg, self.dim, self.hidden, self.act = cfg, dim, hidden, act
        self.num_experts, self.top_k, self.num_modalities = cfg.num_experts, cfg.top_k, num_modalities
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # added to the router input only; small random init so modalities route apart from step 0
        self.modality_embed = nn.Embedding(num_modalities, dim) if cfg.modality_routing else None
        # one stacked tensor per layer: a single parameter for DDP/optimizers, and bench.py reads them
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts, dim, hidden))  # (E, D, H)
        self.b1 = nn.Parameter(torch.empty(cfg.num_experts, hidden))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, hidden, dim))  # (E, H, D)
        self.b2 = nn.Parameter(torch.empty(cfg.num_experts, dim))  # (E, D)
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

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """Expert e alone on x: [n, D] -> [n, D], with plain autograd; the reference for tests and bench.py."""
        w1, b1, w2, b2 = (t[e].to(x.dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        return self.dropout(torch.addmm(b2, ACTIVATIONS[self.act](torch.addmm(b1, x, w1)), w2))  # (n, D)

    def router_logits(self, x: Tensor, modality: Tensor | None) -> Tensor:
        """Router logits [N, E], always float32 (the softmax and top-k are precision sensitive).
        modality None: x already carries the modality embedding."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()  # (N, D)
            if self.modality_embed is not None and modality is not None:
                h = h + self.modality_embed(modality).float()
            if self.training and self.cfg.router_jitter > 0:
                # multiplicative noise (Switch) for exploration; eval stays deterministic
                eps = self.cfg.router_jitter
                h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
            return F.linear(h, self.gate.weight.float())  # (N, E)

    def choose(self, logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's experts [N, k] (first choice first) and their probabilities [N, k]. The top k, or
        with sample_second in training the first and then k-1 others drawn by Gumbel-max from the logits
        (official EVE; its evaluation samples too, ours stays deterministic)."""
        if not (self.cfg.sample_second and self.training) or self.top_k == 1:
            return probs.topk(self.top_k, dim=-1)
        first = probs.argmax(dim=-1, keepdim=True)  # (N, 1)
        gumbel = -torch.empty_like(logits).exponential_().log()  # -log(Exp(1)) ~ Gumbel(0, 1)
        others = (logits + gumbel).scatter(1, first, float("-inf")).topk(self.top_k - 1, dim=-1).indices
        top_e = torch.cat([first, others], dim=1)  # (N, k)
        return probs.gather(1, top_e), top_e

    def forward(self, x: Tensor, modality: Tensor) -> tuple[Tensor, dict]:
        """x: [N, D] tokens (padding already removed); modality: [N] long, 0 = vision, 1 = text.

        Returns y: [N, D] and a dict of stats: aux_loss, z_loss, tokens_per_expert [M, E], drop_fraction,
        first_expert [N] (each token's first-choice expert, whether or not capacity dropped it).
        """
        N, D = x.shape
        E, k = self.num_experts, self.top_k

        if self.cfg.embed_to_experts and self.modality_embed is not None:
            # official EVE dispatches the router's input: the experts see x + modality embedding too
            x = x + self.modality_embed(modality).to(x.dtype)
            logits = self.router_logits(x, None)  # (N, E)
        else:
            logits = self.router_logits(x, modality)  # (N, E)
        # route: fp32 softmax, top-k, renormalise so each token's k weights sum to 1
        probs = logits.softmax(dim=-1)  # (N, E)
        top_w, top_e = self.choose(logits, probs)  # (N, k)
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
        c = self.cfg
        cap = max(math.ceil(c.capacity_factor * A / E), c.min_capacity) if c.capacity_factor > 0 else A
        # an assignment is kept if it is among the first `cap` of its expert's slice
        starts = counts.cumsum(0) - counts  # (E,)
        kept = torch.arange(A, device=x.device) - starts[e_sorted] < cap  # (A,)
        tok_kept, w_kept = tok_sorted[kept], w_sorted[kept]
        if self.cfg.renorm_kept:  # official EVE: the kept weights of a token sum to 1 again (one kept of two gets 1)
            kept_sum = w_kept.new_zeros(N).index_add_(0, tok_kept, w_kept)  # (N,)
            w_kept = w_kept / kept_sum[tok_kept].clamp(min=torch.finfo(w_kept.dtype).eps)
        # the one host sync: the experts' slice lengths must be Python ints
        kept_counts = counts.clamp(max=cap).tolist()

        # under autocast the experts run in its dtype, like the nn.Linear layers around them; the kernel
        # casts their weights one expert at a time (no full low-precision copy of all experts)
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # index_select, not x[tok_kept]: its backward is an index_add_, not a slower accumulating index_put_
        out = ExpertFFN.apply(x.index_select(0, tok_kept).to(dt), self.w1, self.b1, self.w2, self.b2,
                              kept_counts, self.act)  # (A_kept, D) grouped by expert, in dtype dt
        out = self.dropout(out) * w_kept.to(dt).unsqueeze(1)
        # without renorm_kept a dropped assignment simply contributes nothing
        y = x.new_zeros(N, D).index_add_(0, tok_kept, out.to(x.dtype))  # (N, D)

        stats = self._stats(probs, top_e, logits, modality, e_sorted[kept], tok_kept, A)
        return y, stats

    def _stats(self, probs, top_e, logits, modality, e_kept, tok_kept, A) -> dict:
        E, M = self.num_experts, self.num_modalities
        tokens_per_expert = torch.bincount(modality[tok_kept] * E + e_kept, minlength=M * E).view(M, E)
        return {
            'aux_loss': load_balancing_loss(probs, top_e[:, :1] if self.cfg.aux_official else top_e, E),
            'z_loss': router_z_loss(logits),
            'tokens_per_expert': tokens_per_expert,
            'drop_fraction': 1.0 - tokens_per_expert.sum().float() / max(A, 1),
            'first_expert': top_e[:, 0],  # (N,) each token's first choice, in input order (pictures)
        }


# ---- the performance kernel: a hand-written forward and backward of all experts at once ----

class ExpertFFN(torch.autograd.Function):
    """Every expert's two-layer FFN (activation `act` of ACTIVATIONS) on its contiguous slice of the expert-sorted tokens.

    What it computes is MoE.expert_forward of each expert on its slice; it exists for speed.
    Autograd over per-expert slices of the stacked weights would give each expert a full-size
    (E, D, H) gradient and then add them up; here each expert's weight gradient is written once,
    straight into its row of one (E, D, H) tensor: a step reads the expert weights twice and
    writes their gradients once, whatever the number of tokens. Idle experts get
    zero gradients, so every parameter is in the graph (DDP needs that). The matmuls run in x's
    dtype; weights in another dtype (fp32 master weights of a bf16 step) are cast one expert at a
    time, while that expert's slice of weights is in cache, and their gradients come back in the
    weights' dtype. docs/SPEED.md has the measurements.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, counts, act="gelu"):
        """x: [A, D] grouped by expert, counts[e] rows each; w1: [E, D, H], b1: [E, H], w2: [E, H, D], b2: [E, D]."""
        dt = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # the dtype is chosen by the caller
            pre = x.new_empty(x.shape[0], w1.shape[2])  # (A, H) pre-activations, kept for backward
            for e, rows in enumerate(_slices(counts)):
                torch.addmm(b1[e].to(dt), x[rows], w1[e].to(dt), out=pre[rows])  # .to: a no-op in one dtype
            h = ACTIVATIONS[act](pre)  # (A, H): one elementwise call for all experts
            out = x.new_empty(x.shape)  # (A, D)
            for e, rows in enumerate(_slices(counts)):
                torch.addmm(b2[e].to(dt), h[rows], w2[e].to(dt), out=out[rows])
        ctx.save_for_backward(x, w1, w2, pre, h)
        ctx.counts, ctx.act = counts, act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w1, w2, pre, h = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # (A, D)
        E, D, H = w1.shape
        dt, wt = x.dtype, w1.dtype  # compute dtype, weight (and weight-gradient) dtype
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)  # (E, D, H), (E, H, D)
        grad_b1, grad_b2 = w1.new_empty(E, H), w1.new_empty(E, D)
        grad_h = torch.empty_like(pre)  # (A, H)
        for e, rows in enumerate(_slices(ctx.counts)):  # an idle expert's sums and products are zeros
            _mm_into(grad_w2[e], h[rows].t(), grad_out[rows])
            torch.sum(grad_out[rows], dim=0, dtype=wt, out=grad_b2[e])
            torch.mm(grad_out[rows], w2[e].to(dt).t(), out=grad_h[rows])
        grad_pre = activation_backward(ctx.act, grad_h, pre)  # (A, H)
        grad_x = torch.empty_like(x)  # (A, D)
        for e, rows in enumerate(_slices(ctx.counts)):
            _mm_into(grad_w1[e], x[rows].t(), grad_pre[rows])
            torch.sum(grad_pre[rows], dim=0, dtype=wt, out=grad_b1[e])
            torch.mm(grad_pre[rows], w1[e].to(dt).t(), out=grad_x[rows])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def _mm_into(out: Tensor, a: Tensor, b: Tensor):
    """out = a @ b, multiplied in a's dtype and stored in out's (a bf16 product into an fp32 gradient)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


def _slices(counts: list[int]):
    """Row slices of consecutive segments of the given lengths."""
    start = 0
    for c in counts:
        yield slice(start, start + c)
        start += c


def activation_backward(act: str, grad: Tensor, pre: Tensor) -> Tensor:
    """grad * act'(pre), the backward of ACTIVATIONS[act] for ExpertFFN."""
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    s = torch.sigmoid(1.702 * pre)  # d/dx x*s(ax) = s(ax) + a*x*s(ax)*(1 - s(ax))
    return grad * (s + 1.702 * pre * s * (1 - s))
