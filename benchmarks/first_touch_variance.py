"""Why a step that allocates hundreds of MB of fresh tensors cannot be timed within 20 % on this machine.

A fresh tensor's pages fault in on first write (glibc hands allocations of 32 MiB and more straight to the OS).
`paramcalc calibrate` measures that cost in a small process; this script measures it while the process holds
more memory, as a training step does, and repeats it: on a VM whose memory the host backs lazily the cost
moves by several times from one allocation to the next, which no calibrated rate can predict.

    python benchmarks/first_touch_variance.py   # prints a table; results/first_touch_variance.md keeps one run
"""

import platform
import statistics
import time

import torch

MB = 154_000_000  # GPT-2's 50,257 x 768 fp32 embedding gradient: a fresh one every step


def fresh_fill(nbytes: int) -> float:
    start = time.perf_counter()
    torch.empty(nbytes // 4).fill_(1.0)
    return time.perf_counter() - start


def warm_fill(tensor) -> float:
    start = time.perf_counter()
    tensor.fill_(2.0)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    print(f"fill of a fresh {MB / 1e6:.0f} MB fp32 tensor vs one allocated before; {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}\n")
    print("| held by the process | warm fill ms (median) | fresh fill ms (median) | fresh fill ms (max) | max / median |")
    print("|---|---|---|---|---|")
    warm = torch.empty(MB // 4)
    for held_gb in (0, 2, 6):
        held = [torch.ones(250_000_000 // 4) for _ in range(held_gb * 4)]  # touched: resident
        fresh = [fresh_fill(MB) for _ in range(12)]
        warm_s = statistics.median(warm_fill(warm) for _ in range(5))
        med = statistics.median(fresh)
        print(f"| {held_gb} GB | {warm_s * 1e3:.1f} | {med * 1e3:.1f} | {max(fresh) * 1e3:.1f} | {max(fresh) / med:.1f}x |")
        del held


if __name__ == "__main__":
    main()
