"""Tests for moe.py against a naive dense reference and hand-computed cases (CPU, seconds)."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe import ExpertFFN, MoE, MoEConfig, load_balancing_loss, router_z_loss  # noqa: E402


def make_moe(seed=0, dim=16, hidden=32, num_experts=4, **kw):
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, MoEConfig(num_experts=num_experts, **kw))
    # random biases (default init is zero) so bias handling is exercised too
    with torch.no_grad():
        moe.b1.normal_(std=0.1)
        moe.b2.normal_(std=0.1)
    return moe


def naive_moe(moe, x, modality):
    """Every expert on every token, with plain matmuls; unchosen experts get weight 0."""
    h = x
    if moe.modality_embed is not None:
        h = x + moe.modality_embed.weight[modality]
    probs = torch.softmax(h @ moe.gate.weight.t(), dim=-1)  # (N, E)
    top_w, top_e = probs.topk(moe.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    dense_w = torch.zeros_like(probs).scatter(1, top_e, top_w)  # (N, E)
    y = torch.zeros_like(x)
    for e in range(moe.num_experts):
        out = F.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
        y = y + dense_w[:, e:e + 1] * out
    return y, top_e


def grads(moe, x):
    return [x.grad, moe.w1.grad, moe.b1.grad, moe.w2.grad, moe.b2.grad, moe.gate.weight.grad,
            moe.modality_embed.weight.grad]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_matches_naive_reference_forward_and_backward(top_k):
    moe = make_moe(top_k=top_k)
    N = 40
    x = torch.randn(N, 16)
    modality = torch.randint(0, 2, (N,))
    target = torch.randn(N, 16)  # a random cotangent so every output element matters

    x1 = x.clone().requires_grad_()
    y, stats = moe(x1, modality)
    (y * target).sum().backward()
    got = [g.clone() for g in grads(moe, x1)]

    moe.zero_grad()
    x2 = x.clone().requires_grad_()
    y_ref, _ = naive_moe(moe, x2, modality)
    (y_ref * target).sum().backward()
    ref = grads(moe, x2)

    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert stats['drop_fraction'].item() == 0.0


def test_expert_forward_is_the_plain_ffn():
    moe = make_moe()
    x = torch.randn(5, 16)
    ref = F.gelu(x @ moe.w1[2] + moe.b1[2]) @ moe.w2[2] + moe.b2[2]
    torch.testing.assert_close(moe.expert_forward(2, x), ref)


def test_load_balancing_loss_by_hand():
    E, N = 4, 8
    # uniform: every prob 1/E, assignments spread evenly over experts -> exactly 1
    probs = torch.full((N, E), 1.0 / E)
    index = torch.arange(N * 2).view(N, 2) % E
    torch.testing.assert_close(load_balancing_loss(probs, index, E), torch.tensor(1.0))
    # k=1, all to expert 0 with p0 = 0.7: f = (1,0,0,0), P = (0.7,..) -> 4 * 0.7
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(N, 1)
    index = torch.zeros(N, 1, dtype=torch.long)
    torch.testing.assert_close(load_balancing_loss(probs, index, E), torch.tensor(2.8))
    # k=2, all to (0, 1): f = (.5,.5,0,0), P = (.4,.4,.1,.1) -> 4 * (.2 + .2) = 1.6
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1]]).repeat(N, 1)
    index = torch.tensor([[0, 1]]).repeat(N, 1)
    torch.testing.assert_close(load_balancing_loss(probs, index, E), torch.tensor(1.6))


def test_z_loss_by_hand_and_stats_agree():
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 4)), torch.tensor(math.log(4) ** 2))
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    hand = (math.log(math.e + math.e ** 2) ** 2 + math.log(1 + math.e ** -1) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(hand))

    moe = make_moe().eval()
    x, modality = torch.randn(12, 16), torch.randint(0, 2, (12,))
    _, stats = moe(x, modality)
    logits = moe.router_logits(x, modality)
    probs = logits.softmax(-1)
    torch.testing.assert_close(stats['z_loss'], router_z_loss(logits))
    torch.testing.assert_close(stats['aux_loss'], load_balancing_loss(probs, probs.topk(2, -1).indices, 4))


def routed_moe(capacity_factor, first, second, modality_routing=False):
    """An MoE whose gate reads logits straight from x[:, :E]: the token's first choice gets 4, second 2."""
    E, D, N = 4, 8, len(first)
    moe = make_moe(dim=D, hidden=12, num_experts=E, top_k=2, modality_routing=modality_routing,
                   capacity_factor=capacity_factor)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(E, D))
    x = torch.randn(N, D) * 0.1
    x[:, :E] = 0.0
    x[torch.arange(N), torch.tensor(first)] = 4.0
    x[torch.arange(N), torch.tensor(second)] = 2.0
    return moe, x


def test_capacity_drops_exactly_the_overflow():
    # 12 tokens: 0-9 pick expert 0 first, 10-11 pick expert 3 first.
    # second choices: 0-4 -> 3, 5-9 -> 1, 10-11 -> 2. capacity = ceil(0.6 * 24 / 4) = 4.
    first = [0] * 10 + [3, 3]
    second = [3] * 5 + [1] * 5 + [2, 2]
    moe, x = routed_moe(0.6, first, second)
    modality = torch.tensor([0, 1] * 6)
    y, stats = moe(x, modality)

    # by hand: e0 keeps rank-0 of tokens 0-3; e3 keeps rank-0 of 10, 11 before rank-1 of 0, 1
    # (first choices have priority over earlier tokens' second choices); e1 keeps 5-8; e2 keeps 10, 11
    kept = {0: [0, 3], 1: [0, 3], 2: [0], 3: [0], 4: [], 5: [1], 6: [1], 7: [1], 8: [1], 9: [],
            10: [3, 2], 11: [3, 2]}
    w_first = 1.0 / (1.0 + math.exp(-2.0))  # renormalised softmax weight of logit 4 vs logit 2
    expected = torch.zeros_like(x)
    for n, experts in kept.items():
        for e in experts:
            w = w_first if e == first[n] else 1.0 - w_first
            expected[n] += w * moe.expert_forward(e, x[n:n + 1])[0]
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-6)
    assert y[4].abs().sum() == 0 and y[9].abs().sum() == 0

    n_kept = sum(len(v) for v in kept.values())
    assert n_kept == 14
    torch.testing.assert_close(stats['drop_fraction'], torch.tensor(1.0 - 14 / 24))
    tpe = torch.zeros(2, 4, dtype=torch.long)
    for n, experts in kept.items():
        for e in experts:
            tpe[n % 2, e] += 1
    assert torch.equal(stats['tokens_per_expert'], tpe)


def test_dropless_keeps_everything_with_same_routing():
    moe, x = routed_moe(0.0, [0] * 10 + [3, 3], [3] * 5 + [1] * 5 + [2, 2])
    y, stats = moe(x, torch.zeros(12, dtype=torch.long))
    y_ref, _ = naive_moe(moe, x, torch.zeros(12, dtype=torch.long))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-6)
    assert stats['drop_fraction'].item() == 0.0
    assert torch.equal(stats['tokens_per_expert'][0], torch.tensor([10, 5, 2, 7]))


def test_eval_deterministic_train_jitter_differs():
    moe = make_moe(router_jitter=0.1)
    x, modality = torch.randn(20, 16), torch.randint(0, 2, (20,))
    moe.eval()
    y1, _ = moe(x, modality)
    y2, _ = moe(x, modality)
    assert torch.equal(y1, y2)
    assert torch.equal(moe.router_logits(x, modality), moe.router_logits(x, modality))
    moe.train()
    assert not torch.equal(moe.router_logits(x, modality), moe.router_logits(x, modality))
    y3, _ = moe(x, modality)
    assert not torch.equal(y1, y3)


def test_idle_experts_give_zero_grads_and_correct_output():
    # experts 2 and 3 never win: the gate only reads x[:, :2], which favours experts 0 and 1
    moe, x = routed_moe(0.0, [0, 1, 0, 1, 1], [1, 0, 1, 0, 0])
    x.requires_grad_()
    modality = torch.zeros(5, dtype=torch.long)
    y, stats = moe(x, modality)
    assert stats['tokens_per_expert'][0, 2:].sum() == 0
    y.sum().backward()
    for p in moe.parameters():
        assert p.grad is not None
    for p in (moe.w1, moe.b1, moe.w2, moe.b2):
        assert p.grad[2:].abs().sum() == 0 and p.grad[:2].abs().sum() > 0
    y_ref, _ = naive_moe(moe, x.detach(), modality)
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("modality_routing", [True, False])
def test_modality_routing(modality_routing):
    moe = make_moe(dim=8, num_experts=4, top_k=1, modality_routing=modality_routing)
    h = torch.randn(1, 8).repeat(2, 1)  # the same hidden vector twice
    modality = torch.tensor([0, 1])  # once as vision, once as text
    logits = moe.router_logits(h, modality)
    if not modality_routing:
        assert moe.modality_embed is None
        assert torch.equal(logits[0], logits[1])
        return
    # even the small default init separates the modalities
    assert not torch.allclose(logits[0], logits[1])
    # a scaled embedding that points vision at expert 0 and text at expert 1 routes them apart
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4, 8))
        moe.modality_embed.weight.zero_()
        moe.modality_embed.weight[0, 0] = 10.0
        moe.modality_embed.weight[1, 1] = 10.0
    _, stats = moe(h * 0.1, modality)
    assert torch.equal(stats['tokens_per_expert'], torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]]))
    # the expert input is the raw token: the embedding must not leak into it
    y, _ = moe(h, modality)
    torch.testing.assert_close(y[0], moe.expert_forward(0, h[:1])[0])


def test_tokens_per_expert_counts_by_modality():
    moe = make_moe(top_k=2, num_experts=6)
    N = 50
    x, modality = torch.randn(N, 16), torch.randint(0, 2, (N,))
    _, stats = moe(x, modality)
    _, top_e = naive_moe(moe, x, modality)
    hand = torch.zeros(2, 6, dtype=torch.long)
    for n in range(N):
        for e in top_e[n].tolist():
            hand[modality[n], e] += 1
    assert torch.equal(stats['tokens_per_expert'], hand)
    for m in range(2):
        assert stats['tokens_per_expert'][m].sum() == (modality == m).sum() * 2


def test_bf16_autocast_router_stays_fp32():
    moe = make_moe()
    x, modality = torch.randn(24, 16), torch.randint(0, 2, (24,))
    y_ref, _ = naive_moe(moe, x, modality)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = moe.router_logits(x, modality)
        y, stats = moe(x, modality)
        y_bf16, _ = moe(x.bfloat16(), modality)
    assert logits.dtype == torch.float32
    assert stats['z_loss'].dtype == torch.float32 and stats['aux_loss'].dtype == torch.float32
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0.05, atol=0.02)
    y.sum().backward()
    assert moe.w1.grad is not None and moe.gate.weight.grad.dtype == torch.float32

    # bf16 weight gradients follow the fp32 ones (the expert kernel's backward in bf16)
    grads = [p.grad.clone() for p in (moe.w1, moe.w2)]
    moe.zero_grad()
    naive_moe(moe, x, modality)[0].sum().backward()
    for got, want in zip(grads, (moe.w1.grad, moe.w2.grad)):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("counts", [[3, 0, 4, 2], [0, 0, 5, 0]])
def test_expert_ffn_gradcheck(counts):
    """The hand-written backward against finite differences (float64), idle experts included."""
    torch.manual_seed(0)
    E, D, H, A = len(counts), 3, 5, sum(counts)
    args = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
            for s in ((A, D), (E, D, H), (E, H), (E, H, D), (E, D))]
    assert torch.autograd.gradcheck(lambda *a: ExpertFFN.apply(*a, counts), args)
    out = ExpertFFN.apply(*args, counts)
    start = 0
    for e, n in enumerate(counts):  # each expert's slice is that expert's plain FFN
        x_e = args[0][start:start + n]
        torch.testing.assert_close(out[start:start + n], F.gelu(x_e @ args[1][e] + args[2][e]) @ args[3][e] + args[4][e])
        start += n


def test_first_expert_is_the_routers_argmax_in_token_order():
    moe = make_moe(num_experts=6, capacity_factor=0.5).eval()  # a tight capacity: dropped tokens keep their choice
    x, modality = torch.randn(30, 16), torch.randint(0, 2, (30,))
    _, stats = moe(x, modality)
    want = moe.router_logits(x, modality).argmax(-1)  # (N,)
    assert stats['first_expert'].dtype == torch.long and torch.equal(stats['first_expert'], want)
    assert stats['drop_fraction'] > 0
    # permuting the tokens permutes the first choices alike
    perm = torch.randperm(30)
    assert torch.equal(moe(x[perm], modality[perm])[1]['first_expert'], want[perm])


def test_expert_ffn_casts_fp32_weights_per_expert_like_a_full_bf16_copy():
    """bf16 tokens with fp32 (master) weights: the kernel casts one expert at a time. Outputs and weight
    gradients equal those of the same kernel on a bf16 copy of the weights, and come back in fp32."""
    torch.manual_seed(0)
    counts = [5, 0, 7, 3]
    E, D, H, A = len(counts), 8, 12, sum(counts)
    x = torch.randn(A, D).bfloat16()
    weights = [torch.randn(*s) for s in ((E, D, H), (E, H), (E, H, D), (E, D))]
    g = torch.randn(A, D).bfloat16()
    runs = []
    for cast_first in (False, True):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        out = ExpertFFN.apply(xs, *(w.bfloat16() if cast_first else w for w in ws), counts)
        out.backward(g)
        runs.append((out, xs.grad, *(w.grad for w in ws)))
    (out, gx, gw1, gb1, gw2, gb2), ref = runs
    assert out.dtype == torch.bfloat16 and gw1.dtype == gb1.dtype == torch.float32
    for got, want in zip((out, gx, gw1, gw2), (ref[0], ref[1], ref[2], ref[4])):
        assert torch.equal(got, want)
    # the bias gradients are summed in fp32 now, in bf16 before: close, not equal
    for got, want in zip((gb1, gb2), (ref[3], ref[5])):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)
