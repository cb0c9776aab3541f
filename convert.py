#!/usr/bin/env python3
"""Entry point: `python convert.py RECIPE [--set k=v ...]`; see converter/cli/main.py."""

import sys

from converter.cli.main import exit_on_sigterm, main

if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
