"""How much faster is the analytic count than building the model on the meta device?

Runs both in one go, on the same machine, and prints the ratio (absolute times on
shared machines are noise; the ratio measured in one run is the figure to quote).

    python benchmarks/analytic_vs_meta.py [MODEL] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def best_of(command: list[str], repeat: int, env: dict) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="bert-base-uncased")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    paramcalc = shutil.which("paramcalc") or sys.exit("install paramcalc first (pip install .)")
    cache = tempfile.mkdtemp(prefix="paramcalc-bench-")
    env = {**os.environ, "PARAMCALC_CACHE_DIR": cache}

    cold = best_of([paramcalc, args.model, "--json"], 1, env)[0]  # first run fills the formula cache
    analytic_best, analytic_median = best_of([paramcalc, args.model, "--json"], args.repeat, env)
    meta_code = (
        "import json, torch, transformers, paramcalc.configs as c;"
        f"cfg = c.resolve({args.model!r}).config;"
        "from paramcalc.meta import build_meta_model;"
        "m = build_meta_model(cfg, task='base');"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    meta_best, meta_median = best_of([sys.executable, "-c", meta_code], args.repeat, env)
    print(f"model: {args.model}   (best / median of {args.repeat} runs, each a fresh process)")
    print(f"  paramcalc {args.model} --json, first run (fills formula cache): {cold:.3f} s")
    print(f"  paramcalc {args.model} --json, analytic:      {analytic_best:.3f} s / {analytic_median:.3f} s")
    print(f"  build on the meta device (torch + transformers): {meta_best:.3f} s / {meta_median:.3f} s")
    print(f"  ratio meta / analytic: {meta_best / analytic_best:.1f}x (best), {meta_median / analytic_median:.1f}x (median)")
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
