"""bench.py is correct (not fast): every JSON key is there, the one-hot baseline computes what
moe.py computes, and the FLOP counter is exact on matmuls. No timing is asserted."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import bench_peer  # noqa: E402
import profiling  # noqa: E402
from moe import MoE, MoEConfig  # noqa: E402

KEYS = ["msm_step_s", "itc_itm_step_s", "msm_vs_itc_itm_speedup", "moe_step_s", "dense_equiv_step_s",
        "moe_vs_dense_ratio", "onehot_step_s", "moe_vs_onehot_speedup", "matmul_peak_flops",
        "matmul_peak_flops_bf16", "train_flops_per_s", "mfu", "mfu_fp32", "mfu_bf16", "peak_mem_mb",
        "memory_bandwidth_bytes_per_s", "moe_memory_floor_s", "dense_equiv_memory_floor_s",
        "mask_ratio_scaling", "resolution_scaling", "moe_token_scaling"]


def test_quick_run_writes_every_key(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--quick", "--device", "cpu", "--batch-size", "4", "--experts", "16",
                "--matmul-size", "128", "--profile", "--bf16", "on", "--json", str(out)])
    res = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in res]
    assert not missing, missing
    for k in KEYS[:-3]:
        assert math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert res["mfu"] == res["mfu_fp32"]  # the run's dtype on CPU
    assert res["onehot_max_abs_err"] < 1e-4 and res["onehot_experts"] == 16
    assert res["train_flops"] > 0 and res["moe_tokens"] > res["moe_vision_tokens"] > 0
    printed = capsys.readouterr().out  # --profile: the operator tables of an MSM step and of the MoE layer
    assert "profile of one MSM training step" in printed and "ExpertFFN" in printed


def test_slow_bf16_rows_are_skipped_with_a_reason(tmp_path, capsys, monkeypatch):
    """A CPU that emulates bf16 (the probe finds it slower than fp32): no bf16 step, matmul or MFU, and it says why."""
    monkeypatch.setattr(bench, "probe_bf16", lambda device: 0.01)
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--quick", "--device", "cpu", "--batch-size", "2", "--experts", "8",
                "--matmul-size", "64", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["bf16_rows"] is False and res["bf16_probe_speedup"] == 0.01
    assert res["msm_step_s_bf16"] is None and res["mfu_bf16"] is None and res["matmul_peak_flops_bf16"] is None
    assert res["mfu_fp32"] > 0 and res["mask_ratio_scaling"] == [] and res["moe_token_scaling"] == []
    captured = capsys.readouterr()
    assert "skipping the bf16 rows" in captured.err and "100.0x SLOWER" in captured.err
    assert "skipped" in captured.out


def test_bf16_probe_and_cpu_info():
    assert profiling.probe_bf16(torch.device("cpu"), n=32, repeats=1) > 0
    model, flags = profiling.cpu_info()
    assert isinstance(model, str) and all("bf16" in f or f.startswith("amx") for f in flags)


def test_moe_memory_floor_by_hand():
    cfg = bench.make_config("tiny")  # 8 experts, top-2, dim 192, hidden 768
    moe_s, dense_s = bench.moe_memory_floor(cfg, bandwidth=1e9, dtype="fp32")
    one_expert = (192 * 768 + 768 * 192) * 4  # bytes of w1 and w2
    assert moe_s == 3 * 8 * one_expert / 1e9 and dense_s == 3 * 2 * one_expert / 1e9


def make_moe(num_experts=8, top_k=2, dim=16, hidden=24, seed=0):
    torch.manual_seed(seed)
    moe = MoE(dim, hidden, MoEConfig(num_experts=num_experts, top_k=top_k))
    with torch.no_grad():  # non-zero biases and a sharper router, so every term matters
        moe.b1.normal_(std=0.1)
        moe.b2.normal_(std=0.1)
        moe.gate.weight.mul_(4)
    return moe


def test_onehot_equals_moe_when_nothing_is_dropped():
    for top_k in (1, 2):
        moe = make_moe(top_k=top_k)
        x, modality = torch.randn(50, 16), torch.randint(0, 2, (50,))
        want, _ = moe(x, modality)  # dropless
        got, dropped = bench.onehot_moe(moe, x, modality, capacity_factor=moe.num_experts / top_k)  # C = N
        assert dropped == 0.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_onehot_drops_like_moe_under_a_tight_capacity():
    moe = make_moe()
    x, modality = torch.randn(64, 16), torch.randint(0, 2, (64,))
    err, dropped = bench.check_onehot(moe, x, modality, capacity_factor=0.5)  # asserts equality inside
    assert dropped > 0.2 and err < 1e-5


def test_onehot_gradients_match_moe():
    moe = make_moe()
    x, modality, g = torch.randn(40, 16), torch.randint(0, 2, (40,)), torch.randn(40, 16)
    grads = []
    for forward in (lambda: moe(x, modality)[0], lambda: bench.onehot_moe(moe, x, modality, 4.0)[0]):
        moe.zero_grad()
        (forward() * g).sum().backward()
        grads.append([p.grad.clone() for p in (moe.w1, moe.b1, moe.w2, moe.b2, moe.gate.weight)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dense_equivalent_does_the_activated_work():
    moe = make_moe(top_k=2)
    w1, b1, w2, b2 = bench.dense_equivalent(moe)
    assert w1.shape == (16, 2 * 24) and w2.shape == (2 * 24, 16)
    # a token sent to experts 0 and 1 with weight 1 each: the dense FFN's output
    x = torch.randn(5, 16)
    want = sum(moe.expert_forward(e, x) for e in range(2))
    got = torch.addmm(b2, torch.nn.functional.gelu(torch.addmm(b1, x, w1)), w2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flop_count_of_matmuls_is_exact():
    M, K, N = 7, 5, 3
    layer = torch.nn.Linear(K, N, bias=False)
    x = torch.randn(M, K, requires_grad=True)
    assert profiling.count_flops(lambda: layer(x)) == 2 * M * N * K
    # backward: the input gradient and the weight gradient, one matmul of the same size each
    assert profiling.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * M * N * K


def test_flop_count_includes_cpu_attention():
    B, H, S, d = 2, 3, 10, 8
    q = torch.randn(B, H, S, d)
    valid = torch.ones(B, 1, 1, S, dtype=torch.bool)
    flops = profiling.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=valid))
    assert flops == 2 * (2 * B * H * S * S * d)  # q @ k^T and p @ v


def test_peer_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    try:
        bench.main(["--peer", "--quick", "--device", "cpu"])
    except SystemExit as e:
        assert "pip install transformers" in str(e) and "--peer" in str(e)
    else:
        raise AssertionError("--peer ran without transformers")


def test_peer_keys_and_equal_tokens():
    """Runs where transformers is installed (it is not a project requirement), e.g. in a --system-site-packages venv."""
    pytest.importorskip("transformers")
    cfg = bench.make_config("tiny", vocab_size=100, dim=32, heads=2, depth=2)
    res = bench_peer.bench_peer(cfg, bench.BenchOptions(), torch.device("cpu"), "fp32", B=2, repeats=1, warmup=0)
    assert res["peer_tokens_per_sample"] == 1 + 64 + 32
    for k in ("vilt_step_s", "eve_dense_step_s", "eve_default_step_s"):
        assert res[k] > 0
    assert res["eve_dense_vs_vilt_speedup"] == res["vilt_step_s"] / res["eve_dense_step_s"]
    # equal work: the same matmul FLOPs up to how attention's backward is counted; top-2 experts do more
    assert abs(res["eve_dense_flops"] / res["vilt_flops"] - 1) < 0.1
    assert res["eve_default_flops"] > 1.1 * res["eve_dense_flops"]


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        bench.main(["--device", "cuda", "--quick"])
    except SystemExit as e:
        assert "CUDA is not available" in str(e)
    else:
        raise AssertionError("--device cuda ran without CUDA")


def test_gpu_check_script_stops_clearly_without_cuda(tmp_path):
    """The CPU-visible part of gpu_check.sh: without a GPU it stops at once with one line, before any work."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", str(root / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr, (r.returncode, r.stderr[-500:])
    assert not (tmp_path / "out" / "bench_base_gpu.json").exists()
