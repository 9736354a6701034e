import os

import pytest

# Keep formula caches out of the user's home and fresh for each test session.
os.environ.setdefault("PARAMCALC_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                          f"paramcalc-test-cache-{os.getpid()}"))


@pytest.fixture
def cli():
    """Run the paramcalc CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    from click.testing import CliRunner

    from paramcalc.cli import main

    def run(*args):
        return CliRunner().invoke(main, list(args))

    return run


@pytest.fixture(scope="session")
def refused():
    """Assert a CLI run was refused as bad input: exit 2, one 'Error:' line naming the problem, no traceback,
    nothing on stdout."""

    def check(result, message):
        assert result.exit_code == 2, result.output
        assert message in result.stderr
        assert "Traceback" not in result.output
        assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
        assert result.stdout == ""  # nothing half-written

    return check


@pytest.fixture(scope="session")
def matches_peft():
    """Assert a result equals peft applied on the meta model: every parameter (name, shape, requires_grad)
    and peft's own get_nb_trainable_parameters()."""
    from paramcalc.verify import verify

    def check(result):
        verification = verify(result)
        assert verification.mismatches() == []
        assert verification.peft_counts == (result.trainable_params, result.total_params)
        return verification

    return check
