"""Speed and memory of ncsweep.nc: nc_metrics against one float64 Gram, and streaming state.

Run: PYTHONPATH=src .venv/bin/python benchmarks/nc_metrics.py [--overhead | --large-k]
Each memory configuration runs in a fresh subprocess so that its peak RSS is its own.
``--overhead`` runs only the share of the row-space keys and nc4_test in an eval point.
``--large-k`` runs only N = 60,000 and 30,000, d = 768, K = 5,000 and 10,000 against the floor
(one float64 Gram H^T H and two float32 N x K products), several minutes on 2 cores.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import torch

from ncsweep.nc import HeldOutNC4, NCAccumulator, decisions, geometry, nc_metrics, tensors

N, D, K = 50_000, 512, 10
N_TEST = 10_000
LOOP_SLICE = 5_000
BATCH = 5_000
REPEATS = 3
OVERHEAD_REPEATS = 7
BUDGET = 512 * 2**20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int = REPEATS,
    stat: Callable[[Iterable[float]], float] = statistics.median,
) -> dict[str, tuple[float, float]]:
    """`stat` (wall, CPU) of `repeats` calls each, taken in turns so background load hits all."""
    for fn in fns.values():
        fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {name: (stat(r[0] for r in rs), stat(r[1] for r in rs)) for name, rs in runs.items()}


def per_sample_loop(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """NC1 and NCC agreement sample by sample in float64, as in published NC code."""
    h, w, b = h.double(), w.double(), b.double()
    means = torch.stack([h[y == c].mean(dim=0) for c in range(K)])
    sigma_w = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64)
    mismatches = 0
    for i in range(h.shape[0]):
        z = h[i] - means[y[i]]
        sigma_w += torch.outer(z, z)
        nearest = torch.argmin(torch.norm(h[i] - means, dim=1))
        mismatches += int(torch.argmax(w @ h[i] + b) != nearest)
    m = means - h.mean(dim=0)
    eigval, eigvec = torch.linalg.eigh(m.T @ m / K)
    eigval, eigvec = eigval[-(K - 1) :], eigvec[:, -(K - 1) :]
    float(torch.trace(sigma_w / h.shape[0] @ eigvec @ torch.diag(1 / eigval) @ eigvec.T) / K)


def speed() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=gen)
    y = torch.randint(0, K, (N,), generator=gen)
    w, b = torch.randn(K, D, generator=gen), torch.randn(K, generator=gen)
    h64 = h.double()
    print(
        f"nc_metrics speed: N={N}, d={D}, K={K}, float32 features, torch {torch.__version__}, "
        f"median of {REPEATS} interleaved runs, load average {os.getloadavg()[0]:.1f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        med = interleaved_medians(
            {"gram": lambda: h64.T @ h64, "nc": lambda: nc_metrics(h, y, w, b)}
        )
        (gram_wall, gram_cpu), (nc_wall, nc_cpu) = med["gram"], med["nc"]
        print(
            f"  {n_threads} thread(s): float64 Gram H64.T @ H64 (conversion excluded) "
            f"{gram_wall:.3f} s wall / {gram_cpu:.3f} s CPU"
        )
        print(
            f"  {n_threads} thread(s): nc_metrics (float64 conversion included)     "
            f"{nc_wall:.3f} s wall / {nc_cpu:.3f} s CPU   ratio {nc_wall / gram_wall:.2f} wall, "
            f"{nc_cpu / gram_cpu:.2f} CPU (target <= 1.5)"
        )
    loop = timed(lambda: per_sample_loop(h[:LOOP_SLICE], y[:LOOP_SLICE], w, b))[0]
    loop *= N / LOOP_SLICE
    print(
        f"  1 thread(s): per-sample loop, {LOOP_SLICE} samples timed, x{N // LOOP_SLICE}: "
        f"{loop:.1f} s = {loop / med['gram'][0]:.0f} x Gram, {loop / med['nc'][0]:.0f} x nc_metrics"
    )
    torch.set_num_threads(threads)


def overhead() -> None:
    """Seconds of the row-space keys and of nc4_test, as a share of the rest of nc_metrics."""
    gen = torch.Generator().manual_seed(2)
    y = torch.randint(0, K, (N,), generator=gen)
    h = 3.0 * torch.nn.functional.one_hot(y, D).float() + torch.randn(N, D, generator=gen)
    h_test = torch.randn(N_TEST, D, generator=gen) + h[:N_TEST]
    w, b = torch.randn(K, D, generator=gen), torch.randn(K, generator=gen)
    acc = NCAccumulator(K)
    acc.update(h, y)
    w64, b64, eps = tensors.as_classifier(w, b, acc._means)
    basis = geometry.rowspace(w64, eps)
    sigma_w = tensors.symmetric_from_upper(acc._scatter) / N
    tile = acc._tile()
    full = decisions.Predictions.build(acc._counts, acc._means, w64, b64, None, tile)
    both = decisions.Predictions.build(acc._counts, acc._means, w64, b64, basis, tile)

    def heldout() -> None:
        test_nc4 = HeldOutNC4(acc, w, b)
        test_nc4.update(h_test)
        test_nc4.compute()

    threads = torch.get_num_threads()
    print(
        f"Row-space keys and nc4_test: N={N:,} train, N_test={N_TEST:,}, d={D}, K={K}, "
        f"float32 features, fastest of {OVERHEAD_REPEATS} interleaved runs (the extra scores are "
        f"a difference of two timings), load average {os.getloadavg()[0]:.1f}"
    )
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        med = interleaved_medians({
            "nc_metrics": lambda: nc_metrics(h, y, w, b),
            "geometry": lambda: geometry.rowspace_metrics(
                acc._counts, acc._means, sigma_w, w64, geometry.rowspace(w64, eps), tile
            ),
            "nc4 only": lambda: full.mismatches(h),
            "nc4 + nc4_rowspace": lambda: both.mismatches(h),
            "nc4_test": heldout,
        }, repeats=OVERHEAD_REPEATS, stat=min)
        wall = {name: m[0] for name, m in med.items()}
        extra_rows = max(0.0, wall["nc4 + nc4_rowspace"] - wall["nc4 only"])
        rowspace = wall["geometry"] + extra_rows
        base = wall["nc_metrics"] - rowspace
        print(
            f"  {n_threads} thread(s): nc_metrics (all keys) {wall['nc_metrics']:.3f} s; "
            f"row-space keys {rowspace:.4f} s (P_W and nc1/nc2_m/nc3_duality "
            f"{wall['geometry']:.4f} s, nc4_rowspace's extra scores {extra_rows:.4f} s); "
            f"nc4_test {wall['nc4_test']:.4f} s"
        )
        print(
            f"  {n_threads} thread(s): share of the eval point's metrics without them "
            f"({base:.3f} s): row-space {rowspace / base:.1%}, nc4_test "
            f"{wall['nc4_test'] / base:.1%}, together {(rowspace + wall['nc4_test']) / base:.1%} "
            f"(target <= 10%)"
        )
    torch.set_num_threads(threads)


def vm_kib(field: str) -> int:
    """A VmXXX field of /proc/self/status in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs value 5)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch number `index`, generated on the fly and reproducibly, so no run holds the data."""
    gen = torch.Generator().manual_seed(1000 + index)
    y = torch.randint(0, K, (BATCH,), generator=gen)
    h = 3.0 * torch.nn.functional.one_hot(y, D).float() + torch.randn(BATCH, D, generator=gen)
    return h, y


def streaming_memory(n: int, max_feature_bytes: int) -> None:
    """One streamed run: pass 1, pass 2 when the features were dropped, compute; print memory."""
    acc = NCAccumulator(K, max_feature_bytes=max_feature_bytes)
    w = torch.randn(K, D, generator=torch.Generator().manual_seed(1))
    batch(0)
    reset_peak_rss()
    rss_start = vm_kib("VmRSS")
    peak_tracked = 0
    start = time.perf_counter()
    for i in range(n // BATCH):
        acc.update(*batch(i))
        peak_tracked = max(peak_tracked, sum(acc.memory_bytes().values()))
    final = acc.memory_bytes()
    second_pass = final["kept_features"] == 0
    if second_pass:
        for i in range(n // BATCH):
            acc.update_predictions(*batch(i), w)
    out = acc.compute(w)
    seconds = time.perf_counter() - start
    peak_rss = (vm_kib("VmHWM") - rss_start) / 1024
    print(
        f"  N={n:>7,} budget {max_feature_bytes / 2**20:3.0f} MiB | state "
        f"{final['state'] / 2**20:4.2f} MiB, kept at end {final['kept_features'] / 2**20:5.1f} "
        f"MiB, peak tracked {peak_tracked / 2**20:5.1f} MiB | peak RSS +{peak_rss:5.1f} MiB | "
        f"nc4 from {'2nd pass' if second_pass else 'kept'}: nc1={out['nc1']:.4f} "
        f"nc4={out['nc4']:.4f} | {seconds:.0f} s",
        flush=True,
    )


def memory() -> None:
    print(
        f"NCAccumulator memory, d={D}, K={K}, float32 batches of {BATCH} made on the fly; "
        f"tracked = its tensors (state + kept), RSS = VmHWM over VmRSS before the first batch"
    )
    for budget in (BUDGET, 0):
        for n in (50_000, 500_000):
            subprocess.run([sys.executable, __file__, "--memory", str(n), str(budget)], check=True)


LARGE_D = 768
LARGE_CONFIGS = ((60_000, 5_000), (30_000, 5_000), (60_000, 10_000), (30_000, 10_000))


def float64_gram_seconds(h: torch.Tensor) -> float:
    """Seconds of one float64 H^T H, the conversion excluded (its copy is freed after)."""
    h64 = h.double()
    return timed(lambda: h64.T @ h64)[0]


def large_k_point(n: int, k: int) -> None:
    """One large-K configuration in this process: the floor, then nc_metrics and its peak RSS."""
    gen = torch.Generator().manual_seed(3)
    y = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=gen)])
    centres = torch.randn(k, LARGE_D, generator=gen)
    h = centres[y] + 2.0 * torch.randn(n, LARGE_D, generator=gen)
    w, b = torch.randn(k, LARGE_D, generator=gen), torch.randn(k, generator=gen)
    m32 = centres - centres.mean(dim=0)
    gram = float64_gram_seconds(h)
    products = timed(lambda: (h @ w.T, h @ m32.T))[0]
    floor = gram + products
    reset_peak_rss()
    rss_start = vm_kib("VmRSS")
    wall = timed(lambda: nc_metrics(h, y, w, b))[0]
    peak = (vm_kib("VmHWM") - rss_start) / 1024
    print(
        f"  N={n:>6,} K={k:>6,}: float64 Gram {gram:6.2f} s + two float32 N x K products "
        f"{products:6.2f} s = floor {floor:6.2f} s | nc_metrics {wall:6.2f} s = "
        f"{wall / floor:4.2f} x floor (target <= 2) | peak RSS +{peak:6.0f} MiB "
        f"(features {n * LARGE_D * 4 / 2**20:.0f} MiB, not counted) | load "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )


def large_k() -> None:
    print(
        f"nc_metrics at large K: d={LARGE_D}, float32 features, {torch.get_num_threads()} "
        f"threads, one fresh process per configuration, peak RSS = VmHWM over VmRSS before "
        f"nc_metrics"
    )
    for n, k in LARGE_CONFIGS:
        subprocess.run([sys.executable, __file__, "--large-k-point", str(n), str(k)], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        streaming_memory(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["--overhead"]:
        overhead()
    elif sys.argv[1:2] == ["--large-k"]:
        large_k()
    elif sys.argv[1:2] == ["--large-k-point"]:
        large_k_point(int(sys.argv[2]), int(sys.argv[3]))
    else:
        speed()
        overhead()
        memory()
