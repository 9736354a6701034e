"""README.md is a user's manual whose examples still work: every command in it runs, and shown output matches.

- ```console blocks: ``$ paramcalc ...`` lines run in-process; the lines after a command are its expected
  output, compared as doctest does (``...`` matches anything, whitespace runs are equal). A command expects
  exit status 0 unless its line ends with ``# exit N``.
- ```pycon blocks are doctests, run in order in one namespace, like one Python session.
- ```bash blocks: every ``paramcalc`` line runs and must succeed; any other command (installing, the test
  suite, the benchmarks, a multi-process launch) must be one of SKIPPED, with the reason it is not run here.

``python tests/test_readme.py --update`` rewrites each console block's output whose check fails with what
the command prints now (then put ``...`` back by hand where output varies from run to run).
"""

from __future__ import annotations

import doctest
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
WIDTH = "120"  # rich tables wrap to the terminal; README's were captured at this width

# Commands shown in README that this test does not run, and why.
SKIPPED = {
    "pip": "installing is what CI does before the tests",
    "pytest": "the test suite itself",
    "python": "benchmarks take minutes; their results are committed under benchmarks/results",
    "accelerate": "two training processes; tests/test_train.py runs the same data-parallel launch",
}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Example:
    line: int  # README line of the command (1-based)
    kind: str  # console, bash or pycon
    command: str
    expected: str | None  # None: output not shown (bash blocks)
    exit_code: int = 0
    output_lines: tuple[int, int] = (0, 0)  # README lines [start, end) holding the shown output


def blocks(text: str):
    """(kind, first line number, lines) of every fenced block."""
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        match = re.match(r"^```(\w+)\s*$", lines[number])
        if not match:
            number += 1
            continue
        end = number + 1
        while not lines[end].startswith("```"):
            end += 1
        yield match.group(1), number + 2, lines[number + 1:end]
        number = end + 1


def examples(text: str) -> list[Example]:
    found = []
    for kind, first, lines in blocks(text):
        if kind == "console":
            starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
            for n, start in enumerate(starts):
                stop = starts[n + 1] if n + 1 < len(starts) else len(lines)
                command, _, status = lines[start][2:].partition("# exit ")
                found.append(Example(first + start, kind, command.strip(),
                                     "\n".join(lines[start + 1:stop]) + "\n", int(status or 0),
                                     (first + start + 1, first + stop)))
        elif kind == "bash":
            for i, line in enumerate(lines):
                command = line.split(" #")[0].strip()
                if command and not command.startswith("#"):
                    found.append(Example(first + i, kind, command, None))
        elif kind == "pycon":
            found.append(Example(first, kind, "\n".join(lines) + "\n", None))
    return found


def run_command(example: Example) -> tuple[int, str]:
    from click.testing import CliRunner

    from paramcalc.cli import main

    words = shlex.split(example.command)
    assert words[0] == "paramcalc", example.command
    result = CliRunner(env={"COLUMNS": WIDTH}).invoke(main, words[1:])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


ALL = examples(README.read_text())
COMMANDS = [e for e in ALL if e.kind != "pycon" and e.command.split()[0] == "paramcalc"]


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory):
    """The commands run in README's order in one empty folder with a private cache, as a reader typing them in
    would: a calibration made by one example is seen by the next."""
    folder = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("PARAMCALC_CACHE_DIR", str(folder / "cache"))
        yield folder


def test_readme_shows_every_command_group():
    commands = " ".join(e.command for e in COMMANDS)
    for shown in ("paramcalc bert-base-uncased", "--lora", "--prompt", "--adapter", "--ia3", "--quant", "--batch",
                  "--fit-batch", "--device", "--json", "--latex", "--verify", "paramcalc list", "paramcalc trace",
                  "paramcalc train", "paramcalc calibrate"):
        assert shown in commands, shown


def test_every_other_command_is_known():
    for example in ALL:
        if example.kind != "pycon":
            program = example.command.split()[0]
            assert program == "paramcalc" or program in SKIPPED, f"README line {example.line}: {example.command}"


@pytest.mark.parametrize("example", COMMANDS, ids=[f"L{e.line}" for e in COMMANDS])
def test_readme_command(example, readme_world):
    status, output = run_command(example)
    assert status == example.exit_code, f"README line {example.line}: {example.command}\n{output}"
    if example.expected is not None:
        checker = doctest.OutputChecker()
        if not checker.check_output(example.expected, output, FLAGS):
            diff = checker.output_difference(doctest.Example(example.command, example.expected), output, FLAGS)
            pytest.fail(f"README line {example.line}: {example.command}\n{diff}")


def test_readme_python_session(readme_world):
    sessions = [e for e in ALL if e.kind == "pycon"]
    assert sessions
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=FLAGS)
    namespace = {}
    for session in sessions:
        test = parser.get_doctest(session.command, namespace, "README", str(README), session.line)
        runner.run(test, out=sys.stdout.write, clear_globs=False)
        namespace = test.globs  # the next block goes on in the same session
    assert runner.failures == 0, "a README Python example failed (see the output above)"


def _shown(expected: str, output: str) -> list[str]:
    """The new output to show, keeping a leading ``...`` that skips the part shown earlier in README (the
    output from the line the old block went on with)."""
    lines = [line.rstrip() for line in output.rstrip("\n").splitlines()]
    old = expected.splitlines()
    if len(old) > 1 and old[0] == "...":
        anchor = old[1].split(" ")[0]  # e.g. 'training step:' lines keep their first word
        for n, line in enumerate(lines):
            if line.startswith(anchor):
                return ["...", *lines[n:]]
    return lines


def update() -> None:
    """Rewrite console outputs that no longer match with what the commands print now."""
    import os
    import tempfile

    lines = README.read_text().splitlines()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ["PARAMCALC_CACHE_DIR"] = os.path.join(folder, "cache")
        changed = []
        for example in COMMANDS:  # in README's order: a calibration is seen by the examples after it
            status, output = run_command(example)
            if example.kind == "console" and not doctest.OutputChecker().check_output(example.expected, output,
                                                                                      FLAGS):
                print(f"README line {example.line}: {example.command} (exit {status})")
                changed.append((example.output_lines, _shown(example.expected, output)))
        for (start, end), output in reversed(changed):  # bottom-up, so earlier line numbers stay valid
            lines[start - 1:end - 1] = output
    README.write_text("\n".join(lines) + "\n")


if __name__ == "__main__" and "--update" in sys.argv:
    update()
