"""Predicted vs measured: real fine-tuning steps of the catalog models, judged by ``paramcalc train``.

    python benchmarks/trainer_validation.py [--device cpu|cuda [--calibrate]] [--quick] [--only NAME[,NAME]]
    python benchmarks/trainer_validation.py --replan RESULTS --profile DEVICE

Each row trains a catalog model (random weights) for a few real steps with ``paramcalc.train.train`` and
compares the measured peak memory (CPU: allocator events; CUDA: max_memory_allocated) and tokens/s with
paramcalc's prediction. Writes ``benchmarks/results/<device>.json`` (every report, whole) and
``benchmarks/results/<device>.md`` (the table, with the median and largest error), and prints the table.
The CPU is calibrated first (into a temporary profile folder, so the user's own profile stays as it is);
tokens/s are judged by ``benchmarks/throughput_accuracy.py`` (calibrated before every row); read them here as
context.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import paramcalc
from paramcalc.step import Step
from paramcalc.train import TrainOptions, train

# the grouped-query decoders at their released widths, fewer layers (4 of Mistral-7B's 32, 2 of Mixtral's 32) so
# that a random-weight build on the CPU and a few steps take seconds
MISTRAL_4 = {"num_hidden_layers": 4}
MIXTRAL_2 = {"num_hidden_layers": 2}
# (model, task, method, quant, batch, seq, step options[, config overrides])
CASES = [
    ("bert-base-uncased", "seq-cls", None, None, 8, 128, {}),
    ("bert-base-uncased", "seq-cls", None, None, 8, 128, {"attention": "eager"}),
    ("bert-base-uncased", "seq-cls", "lora:r=8", None, 8, 128, {"mixed_precision": "bf16"}),
    ("bert-base-uncased", "seq-cls", None, None, 8, 128, {"grad_checkpointing": True}),
    ("roberta-base", "seq-cls", None, None, 4, 128, {}),
    ("roberta-base", "seq-cls", "lora:r=8", None, 4, 128, {"mixed_precision": "bf16"}),
    ("t5-small", "seq2seq-lm", None, None, 8, 128, {}),
    ("t5-small", "seq2seq-lm", "lora:r=8", None, 8, 128, {"mixed_precision": "bf16", "grad_checkpointing": True}),
    ("gpt2", "causal-lm", None, None, 4, 128, {}),
    ("gpt2", "causal-lm", "lora:r=8", None, 4, 128, {"mixed_precision": "bf16"}),
    ("gpt2", "causal-lm", "lora:r=8", "nf4", 4, 128, {"mixed_precision": "bf16"}),
    ("bloom-560m", "causal-lm", None, None, 1, 128, {}),
    ("bloom-560m", "causal-lm", "lora:r=8", None, 2, 128, {"mixed_precision": "bf16"}),
    ("bloom-560m", "causal-lm", "lora:r=16", "nf4", 2, 128, {"mixed_precision": "bf16"}),
    ("tinyllama-1.1b", "causal-lm", None, None, 4, 256, {}),
    ("tinyllama-1.1b", "causal-lm", "lora:r=8", None, 4, 512, {"mixed_precision": "bf16"}),
    ("tinyllama-1.1b", "causal-lm", "lora:r=16", "nf4", 4, 512, {"mixed_precision": "bf16"}),
    ("qwen2-0.5b", "causal-lm", None, None, 4, 256, {}),
    ("qwen2-0.5b", "causal-lm", "lora:r=8", None, 4, 512, {"mixed_precision": "bf16", "grad_checkpointing": True}),
    ("mistral-7b", "causal-lm", "lora:r=8", None, 2, 512, {"mixed_precision": "bf16"}, MISTRAL_4),
    ("mistral-7b", "causal-lm", "lora:r=16", "nf4", 2, 512, {"mixed_precision": "bf16"}, MISTRAL_4),
    ("mixtral-8x7b", "causal-lm", "lora:r=8,targets=q_proj,v_proj", None, 2, 256, {"mixed_precision": "bf16"},
     MIXTRAL_2),
]
QUICK = [0, 2, 6, 9, 10]


def describe(method, quant, step: Step) -> str:
    parts = [method.replace(":", " ") if method else "full"]
    if quant:
        parts.insert(0, f"Q{quant}")
    if step.grad_checkpointing:
        parts.append("+ckpt")
    return " ".join(parts)


def case_dict(case) -> dict:
    model, task, method, quant, batch, seq, extra, *overrides = case
    return {"model": model, "task": task, "method": method, "quant": quant, "batch": batch, "seq": seq,
            "step": extra, "overrides": overrides[0] if overrides else {}}


def counted(case: dict):
    """The case's counted model and its step (what the trainer runs and the predictor plans)."""
    result = paramcalc.count(case["model"], task=case["task"], peft=case["method"], quant=case["quant"],
                             overrides=case["overrides"], formulas=False)
    return result, Step(batch=case["batch"], seq=case["seq"], **case["step"])


def run_case(case, device: str) -> dict:
    case = case_dict(case)
    result, step = counted(case)
    started = time.perf_counter()
    report = train(result, step, TrainOptions(steps=4, warmup=1, device=device))
    document = report.to_dict()
    document["wall_s"] = time.perf_counter() - started
    document["label"] = describe(case["method"], case["quant"], step)
    document["case"] = case
    if case["overrides"]:
        document["model"] += " (" + ", ".join(f"{k}={v}" for k, v in case["overrides"].items()) + ")"
    return document


def replan(document: dict, profile: str) -> dict:
    """A measured row judged again by today's predictor, with no GPU: the same model, method and step planned
    on ``profile`` (a datasheet GPU, or a saved profile) with the measured device's memory."""
    from paramcalc.train import TrainReport, predict

    result, step = counted(document["case"])
    options = TrainOptions(device="cuda", device_mem=f"{document['device']['memory']}B")
    predicted, _ = predict(result, step, options, profile=profile)
    report = TrainReport(document["model"], document["family"], document["task"], document["options"],
                         document["device"], predicted, document["measured"])
    return {**document, "predicted": predicted, "error": report.errors(), "verdict": report.verdict(),
            "replanned": f"predicted again on the {profile} profile, without a GPU (benchmarks/trainer_validation.py "
                         "--replan)"}


def row(document: dict) -> str:
    o, predicted, measured, error = (document["options"], document["predicted"] or {}, document["measured"],
                                     document["error"])
    precision = f"{o['mixed_precision']} mixed" if o["mixed_precision"] else o["dtype"]
    peak = (predicted.get("memory") or {}).get("peak")
    overhead = (predicted.get("memory") or {}).get("overhead", 0)
    tokens = (predicted.get("throughput") or {}).get("tokens_per_s")
    tokens_error = f"{100 * error['tokens_per_s']:+.0f} %" if "tokens_per_s" in error else "—"
    return (f"| {document['model']} | {document['label']} | {o['batch']} x {o['seq']} | {precision} | "
            f"{o['attention']} | {peak - overhead:,} | {measured['memory']['peak']:,} | "
            f"{100 * error['peak']:+.2f} % | "
            f"{f'{tokens:,.0f}' if tokens else '—'} | {measured['tokens_per_s']:,.0f} | "
            f"{tokens_error} |")


HEADER = ("| model | method | batch x seq | precision | attention | predicted peak (B) | measured peak (B) | "
          "error | predicted tokens/s | measured tokens/s | error |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str]) -> None:
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    cases = [CASES[i] for i in QUICK] if "--quick" in argv else CASES
    if "--replan" in argv:  # judge the committed GPU rows again with today's predictor
        name, profile = argv[argv.index("--replan") + 1], argv[argv.index("--profile") + 1]
        documents = json.loads((Path(__file__).parent / "results" / f"{name}.json").read_text())
        documents = [replan(d, profile) for d in documents]
        print(write(documents, name, "cuda", f"--replan {name} --profile {profile}"))
        return
    if "--only" in argv:  # one or more models, comma-separated
        cases = [c for c in cases if c[0] in argv[argv.index("--only") + 1].split(",")]
    os.environ.setdefault("PARAMCALC_CACHE_DIR", tempfile.mkdtemp(prefix="paramcalc-validation-"))
    name = device
    if device == "cpu":
        from paramcalc.calibrate import calibrate, save_profile

        save_profile(calibrate())  # the time prediction needs this CPU's rates
    else:
        from paramcalc.calibrate import calibrate, default_name, save_profile

        name = default_name("cuda")
        if "--calibrate" in argv:  # time against this GPU's measured rates rather than its datasheet
            save_profile(calibrate(device="cuda", quick=True))
    documents, summary = [], "no row ran"
    print(HEADER, flush=True)
    for case in cases:
        try:
            documents.append(run_case(case, device))
        except Exception as exc:  # one row's failure (out of memory, a refusal) is reported; the others run
            print(f"| {case[0]} | {case[2] or 'full'} | failed: {type(exc).__name__}: {str(exc)[:200]} |", flush=True)
            continue
        print(row(documents[-1]), flush=True)
        summary = write(documents, name, device)  # after every row: a run cut short keeps what it measured
    print(summary)


def write(documents: list[dict], name: str, device: str, how: str = "") -> str:
    errors = [abs(d["error"]["peak"]) for d in documents if "peak" in d["error"]]
    summary = (f"peak memory: median |error| {100 * statistics.median(errors):.2f} %, largest "
               f"{100 * max(errors):.2f} % over {len(errors)} runs") if errors else "no peak measured"
    folder = Path(__file__).parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(documents, indent=1) + "\n")
    table = "\n".join([HEADER, *(row(d) for d in documents), "", summary, ""])
    command = f"python benchmarks/trainer_validation.py {how or f'--device {device}'}"
    (folder / f"{name}.md").write_text(f"`{command}`\n\n{table}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
