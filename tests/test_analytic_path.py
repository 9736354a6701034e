"""The analytic path stays light: no torch, no transformers, and formulas come from the cache."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from click.testing import CliRunner
from paramcalc.cli import main
for args in (["bert-base-uncased"], ["t5-small", "--task", "seq2seq-lm", "--json"], ["gpt2", "--latex"], ["list"],
             ["bert-base-uncased", "--lora", "r=8"], ["gpt2", "--task", "seq-cls", "--lora", "targets=all-linear,dora=true"],
             ["t5-small", "--task", "seq2seq-lm", "--quant", "nf4", "--lora", "r=4"],
             ["roberta-base", "--adapter", "kind=houlsby"], ["gpt2", "--prefix", "tokens=5"],
             ["bloom-560m", "--infer", "--context", "512", "--new-tokens", "8", "--device", "t4", "--fit-batch"]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
heavy = sorted(m for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes") if m in sys.modules)
print(",".join(heavy) or "none")
"""


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_analytic_path_imports_neither_torch_nor_transformers(tmp_path, cache):
    env = {**os.environ, "PARAMCALC_CACHE_DIR": str(tmp_path)}
    runs = 2 if cache == "warm" else 1
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none"


def test_warm_run_does_not_import_sympy(tmp_path):
    env = {**os.environ, "PARAMCALC_CACHE_DIR": str(tmp_path)}
    probe = "import sys, paramcalc; paramcalc.count('bert-base-uncased'); print('sympy' in sys.modules)"
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False")


def test_unwritable_cache_still_gives_formulas(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "PARAMCALC_CACHE_DIR": str(blocker / "sub")}  # cannot be created
    probe = "import paramcalc; print(paramcalc.count('gpt2').closed_form)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert "L*(12*H**2 + 13*H)" in out.stdout


@pytest.mark.skipif(os.environ.get("PARAMCALC_EXPECT_INSTALLED") != "1",
                    reason="CI sets PARAMCALC_EXPECT_INSTALLED=1 after a plain (non-editable) pip install .")
def test_installed_command_finds_its_formula_files():
    import paramcalc

    assert "site-packages" in paramcalc.__file__  # not the source checkout
    assert (Path(paramcalc.__file__).parent / "family_files" / "bert.toml").is_file()
    command = shutil.which("paramcalc")
    assert command and Path(command).parent == Path(sys.executable).parent
    out = subprocess.run([command, "bert-base-uncased", "--json"], capture_output=True, text=True, check=True,
                         cwd="/")
    assert json.loads(out.stdout)["total_params"] == 109_482_240
