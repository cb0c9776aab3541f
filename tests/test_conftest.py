"""The suite's own plumbing (tests/conftest.py), run the way the README tells a user to debug."""
import subprocess
import sys

from conftest import ROOT


def test_the_suite_collects_without_xdist():
    """`-p no:xdist` unregisters xdist's hook specs; an xdist hook not marked optional then stops the
    run with INTERNALERROR before a single test runs."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q",
                           "tests/quant/test_ranges.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
    assert "test_ranges.py::test_percentile_range" in proc.stdout
