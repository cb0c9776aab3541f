"""`convert.py` run in-process (exit code, stdout, stderr) or as a subprocess, and the name and
version the tiny recipes write their artifact under."""

import contextlib
import io
import subprocess
import sys

from conftest import ROOT
from converter.cli.main import main

NAME, VERSION = "tiny-w8a8", "1"


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    from converter import progress

    progress.console.file = err
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    finally:
        progress.console.file = sys.stderr
    return code, out.getvalue(), err.getvalue()


def run_subprocess(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "convert.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
