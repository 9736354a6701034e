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
