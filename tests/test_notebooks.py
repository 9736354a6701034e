"""The teaching notebooks run, offline, from a clean kernel, and their own asserts hold.

Each notebook ends by checking its figures against torch.numel, peft or a real run, so executing it is
the test: a number that drifts from the model fails here. Outputs are not committed (the repository
stays diffable); a notebook saved with outputs fails too.
"""

import os
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def _read(path):
    import nbformat

    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert len(PATHS) >= 7, [p.name for p in PATHS]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_committed_without_outputs(path):
    for cell in _read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_ends_by_checking_its_numbers(path):
    code = [cell.source for cell in _read(path).cells if cell.cell_type == "code"]
    assert "assert " in code[-1], f"{path.name}: the last code cell should assert its figures"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    # The kernel is this interpreter (ipykernel's kernel.json says plain "python"), with a private cache
    # and offline: a notebook that reaches for the hub fails instead of waiting.
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PARAMCALC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = _read(path)
    started = time.perf_counter()
    NotebookClient(notebook, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
