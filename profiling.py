"""How bench.py and bench_peer.py measure: calls timed alternately (medians of repeats), FLOPs
counted by torch's FlopCounterMode (with the CPU attention kernel added), torch.profiler's operator
table, peak memory, the CPU's bf16 support, and the peaks that MFU is measured against (matmul
FLOP/s, memory bandwidth). Plus the two things every timed step shares: its optimizer and the
synthetic vocabulary's special ids. Nothing here asserts a speed; tests/test_bench.py checks it."""
import resource
import statistics
import sys
import time

import torch
from torch.utils import flop_counter
from tqdm import tqdm

import training

PAD, CLS, SEP, MASK = 0, 1, 2, 3  # the synthetic vocabulary's special ids (as in tests/test_model.py)


def make_optimizer(model):
    return training.adamw(model, lr=1e-5, weight_decay=0.05)  # the fused AdamW of pretrain.py


# ---- timing, FLOPs and memory ------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(fns, repeats, warmup, device, desc):
    """Median seconds per call of each function; calls are interleaved round by round."""
    times = {name: [] for name in fns}
    bar = tqdm(total=(warmup + repeats) * len(fns), desc=desc, file=sys.stderr, leave=False)
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
            bar.update()
    bar.close()
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.5:  # e.g. other processes' threads competing for the same cores
        print(f"warning: {desc} timings vary up to {spread:.1f}x between repeats; is the machine busy?", file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}


# FlopCounterMode knows the CUDA attention kernels but not the CPU one: same formulas for it
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn):
    """FLOPs (one multiply-add = 2) of the matmuls, convolutions and attention that fn runs."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    return counter.get_total_flops()


def print_profile(title, fn, device, rows=15):
    """torch.profiler's operators of one call of fn (after a warm-up call), by self time: where a step goes."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile of {title}:\n{prof.key_averages().table(sort_by=key, row_limit=rows)}", flush=True)


def peak_memory_mb(device):
    """(MiB, what was measured): allocator peak on CUDA, the whole process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    # ru_maxrss is in KiB on Linux; it cannot be reset, so it also holds the weights and optimizer state
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu peak RSS of the process"


def cpu_info():
    """(model name, bf16-related CPU flags) from /proc/cpuinfo, as `lscpu` shows them; empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return "", []
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
    return field("model name"), sorted(f for f in field("flags").split() if "bf16" in f or f.startswith("amx"))


def probe_bf16(device, n=512, repeats=3):
    """How many times faster an n^3 bf16 matmul is than fp32 here. CPUs without native bf16
    instructions (AVX512-BF16 or AMX) emulate it, far slower than fp32: this small probe
    decides whether the bf16 rows are worth timing at all."""
    a = torch.randn(n, n, device=device)
    a16 = a.bfloat16()
    t = time_alternating({"fp32": lambda: a @ a, "bf16": lambda: a16 @ a16}, repeats, 1, device, "bf16 probe")
    return t["fp32"] / t["bf16"]


def bench_memory_bandwidth(repeats, warmup, device, mib=256):
    """Bytes per second of copying a large tensor into another (each byte read once and written once)."""
    a = torch.empty(mib * 2**18, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_alternating({"copy": lambda: b.copy_(a)}, repeats, warmup, device, "memory bandwidth")
    return dict(memory_bandwidth_bytes_per_s=2 * a.numel() * 4 / t["copy"])


def bench_matmul(n, repeats, warmup, device, bf16=True):
    """Achieved FLOP/s of an n x n x n matmul in fp32 and (bf16) bf16: the peaks that MFU is measured against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    fns = {"fp32": lambda: a @ b}
    if bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: a16 @ b16
    t = time_alternating(fns, repeats, warmup, device, "matmul")
    return dict(matmul_size=n, matmul_peak_flops=2 * n**3 / t["fp32"],
                matmul_peak_flops_bf16=2 * n**3 / t["bf16"] if bf16 else None)

