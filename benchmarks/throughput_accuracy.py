"""Predicted vs measured time of real fine-tuning steps on this CPU, phase by phase.

    python benchmarks/throughput_accuracy.py [--quick] [--saved] [--resume] [--only TEXT]

Each row trains for real through ``paramcalc.train.train`` (the trainer ``paramcalc train`` runs, so both
measure the same way: the median of the steps after warm-up and the memory step, each phase timed inside
them) and holds its tokens/s and its forward / backward / optimizer seconds to ``paramcalc.plan``'s. Rows:
the five families at a small config (4 layers x 256 wide, the released vocabulary) and the catalog models
small enough for a few steps on a couple of cores, x {full fine-tuning, LoRA r=8} x batch shapes; fp32
weights, AdamW, the attention transformers builds by default, random weights.

The CPU is calibrated again (``paramcalc.calibrate.calibrate``) right before each row, into a temporary
profile folder (a shared machine's speed drifts within minutes, and the user's own profile stays as it
is); ``--saved`` plans against the ``cpu`` profile ``paramcalc calibrate`` saved instead. ``--quick``: three
small rows, a smoke test. ``--resume``: keep the rows the last run wrote and run only the missing ones.
``--only TEXT``: the rows whose name holds TEXT. A row that fails prints its one-line error and the run
goes on. Writes ``benchmarks/results/throughput_cpu.json`` (after every row: each row's report, whole,
and this machine) and ``throughput_cpu.md`` (the table). Read the errors as this machine's, under its load.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import paramcalc
from paramcalc.step import Step
from paramcalc.train import TrainOptions, predicted_phases, train

# --set-style overrides (paramcalc.count(..., overrides=...)) that shrink a catalog model to 4 layers x 256
SMALL = {
    "bert": ("bert-base-uncased", "seq-cls", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                                              "intermediate_size": 1024}),
    "roberta": ("roberta-base", "seq-cls", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                                            "intermediate_size": 1024}),
    "t5": ("t5-small", "seq2seq-lm", {"num_layers": 4, "num_decoder_layers": 4, "d_model": 256, "num_heads": 4,
                                      "d_kv": 64, "d_ff": 1024}),
    "gpt2": ("gpt2", "causal-lm", {"n_layer": 4, "n_embd": 256, "n_head": 4}),
    "bloom": ("bloom-560m", "causal-lm", {"n_layer": 4, "hidden_size": 256, "n_head": 4}),
    # grouped-query decoders: 8 query heads on 2 K/V heads, their released vocabularies (Qwen2's 151,936)
    "llama": ("tinyllama-1.1b", "causal-lm", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
                                              "num_key_value_heads": 2, "intermediate_size": 704}),
    "mistral": ("mistral-7b", "causal-lm", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
                                            "num_key_value_heads": 2, "intermediate_size": 896}),
    "qwen2": ("qwen2-0.5b", "causal-lm", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
                                          "num_key_value_heads": 2, "intermediate_size": 704}),
    # a sparse mixture of experts: 8 experts of 688, each token runs 2
    "mixtral": ("mixtral-8x7b", "causal-lm", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
                                              "num_key_value_heads": 2, "intermediate_size": 688}),
}
# (label, catalog model, task, overrides, shapes): the small configs, then the released sizes that fit
MODELS = [(f"{family}-4x256", model, task, overrides, [(4, 128), (8, 256)])
          for family, (model, task, overrides) in SMALL.items()] + [
    ("bert-base-uncased", "bert-base-uncased", "seq-cls", {}, [(4, 128)]),
    ("gpt2", "gpt2", "causal-lm", {}, [(4, 128)]),
    ("t5-small", "t5-small", "seq2seq-lm", {}, [(4, 128)]),
]
METHODS = [None, "lora:r=8"]
# peft has no default LoRA targets for Mixtral (it refuses them): its LoRA rows name peft's usual q_proj, v_proj
LORA = {"mixtral-4x256": "lora:r=8,targets=q_proj,v_proj"}
QUICK = [("bert-4x256", None, (4, 128)), ("gpt2-4x256", "lora:r=8", (4, 128)), ("t5-4x256", None, (4, 128))]
STEPS, WARMUP = 5, 1  # a warm-up step, the memory step, then three timed steps
PHASES = ("forward", "backward", "optimizer")
RESULTS = Path(__file__).parent / "results"

HEADER = ("| model | method | batch x seq | predicted tokens/s | measured tokens/s | error | "
          "forward s (pred / meas) | backward s (pred / meas) | optimizer s (pred / meas) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def rows(quick: bool, only: str | None) -> list[dict]:
    models = {label: (model, task, overrides) for label, model, task, overrides, _ in MODELS}
    cases = QUICK if quick else [(label, method and LORA.get(label, method), shape) for label, *_, shapes in MODELS
                                 for method in METHODS for shape in shapes]
    chosen = [{"name": f"{label} {method or 'full'} {batch}x{seq}", "label": label, "model": models[label][0],
               "task": models[label][1], "overrides": models[label][2], "method": method, "batch": batch, "seq": seq}
              for label, method, (batch, seq) in cases]
    return [case for case in chosen if not only or only in case["name"]]


def run_row(case: dict, use_saved: bool) -> dict:
    """Calibrate (unless --saved), train, and return the report's JSON document with the row's fields."""
    from paramcalc.calibrate import calibrate, save_profile

    calibrated = None
    if not use_saved:
        profile = calibrate()
        save_profile(profile)
        calibrated = {k: profile.get(k) for k in ("fp32", "bandwidth", "load", "threads", "when", "first_touch",
                                                   "in_step", "optimizers")}
    result = paramcalc.count(case["model"], task=case["task"], overrides=case["overrides"], peft=case["method"],
                             formulas=False)
    started = time.perf_counter()
    report = train(result, Step(batch=case["batch"], seq=case["seq"]), TrainOptions(steps=STEPS, warmup=WARMUP))
    document = report.to_dict()
    document.update(row=case, wall_s=time.perf_counter() - started, calibration=calibrated)
    return document


def _seconds(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown_row(document: dict) -> str:
    case = document["row"]
    head = f"| {case['label']} | {case['method'] or 'full'} | {case['batch']} x {case['seq']} |"
    if "failed" in document:
        return f"{head} failed: {document['failed']} | | | | | |"
    throughput = (document["predicted"] or {}).get("throughput") or {}
    measured, error = document["measured"], document["error"]
    mine, timed = predicted_phases(document["predicted"]), measured.get("phases_s") or {}
    phases = " | ".join(f"{_seconds(mine.get(p))} / {_seconds(timed.get(p))}" for p in PHASES)
    predicted = f"{throughput['tokens_per_s']:,.0f}" if throughput.get("tokens_per_s") else "—"
    percent = f"{100 * error['tokens_per_s']:+.1f} %" if error.get("tokens_per_s") is not None else "—"
    return f"{head} {predicted} | {measured['tokens_per_s']:,.0f} | {percent} | {phases} |"


def summary(documents: list[dict]) -> str:
    errors = [abs(d["error"]["tokens_per_s"]) for d in documents
              if "failed" not in d and d["error"].get("tokens_per_s") is not None]
    failed = sum("failed" in d for d in documents)
    tail = f"; {failed} row{'s' if failed != 1 else ''} failed" if failed else ""
    loads = [d["calibration"]["load"] for d in documents if (d.get("calibration") or {}).get("load") is not None]
    if loads:  # a shared machine: how busy the others kept it, as calibrate saw it right before each row
        tail += f"; other processes kept {statistics.median(loads):.1f} cores busy (median, while calibrating)"
    if not errors:
        return f"tokens/s: no row has both a prediction and a measurement{tail}"
    return (f"tokens/s: median |error| {100 * statistics.median(errors):.1f} %, max |error| "
            f"{100 * max(errors):.1f} % over {len(errors)} rows{tail}")


def machine() -> dict:
    import platform

    import torch

    from paramcalc.calibrate import _describe

    return {"device": _describe(torch, "cpu"), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "paramcalc": paramcalc.__version__}


def write(documents: list[dict], about: dict, command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "throughput_cpu.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"machine": about, "command": command, "rows": documents}, indent=1) + "\n")
    os.replace(temporary, path)  # a run stopped midway leaves the last whole file, for --resume
    table = "\n".join([HEADER, *(markdown_row(d) for d in documents), "", summary(documents), ""])
    (RESULTS / "throughput_cpu.md").write_text(
        f"`{command}` on {about['device']} ({about['threads']} threads), torch {about['torch']}\n\n{table}")


def main(argv: list[str]) -> None:
    quick, use_saved, resume = "--quick" in argv, "--saved" in argv, "--resume" in argv
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    if use_saved:
        from paramcalc.devices import _load_calibration

        saved = _load_calibration("cpu")
        if saved is None:
            sys.exit("no saved cpu profile: run 'paramcalc calibrate' first, or drop --saved")
        print(f"saved cpu profile ({saved['when']}): fp32 {saved['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bandwidth {saved['bandwidth'] / 1e9:.1f} GB/s")
    else:  # keep the user's own profile as it is
        os.environ["PARAMCALC_CACHE_DIR"] = tempfile.mkdtemp(prefix="paramcalc-bench-")
        print("calibrating this CPU again before each row: a shared machine's speed drifts within minutes")
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    about, command = machine(), " ".join(["python benchmarks/throughput_accuracy.py", *argv])
    done = {}
    if resume and (RESULTS / "throughput_cpu.json").is_file():
        kept = json.loads((RESULTS / "throughput_cpu.json").read_text()).get("rows", [])
        done = {d["row"]["name"]: d for d in kept if "failed" not in d}
        print(f"resuming: {len(done)} rows kept from the last run")
    documents = []
    print(HEADER, flush=True)
    for case in rows(quick, None):
        document = done.get(case["name"])
        if only and only not in case["name"]:  # not asked for: a kept row stays in the results as it was
            if document is not None:
                documents.append(document)
            continue
        if document is None:
            try:  # each row in a fresh process, as a user calibrates and then trains: nothing carries over
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    document = pool.submit(run_row, case, use_saved).result()
            except Exception as exc:  # noqa: BLE001 - one row's failure is that row's result
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(f"{case['name']}: failed: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
                document = {"row": case, "failed": f"{type(exc).__name__}: {first}"}
        documents.append(document)
        print(markdown_row(document), flush=True)
        write(documents, about, command)
    write(documents, about, command)  # the kept rows after the last one run
    print(summary(documents))


if __name__ == "__main__":
    main(sys.argv[1:])
