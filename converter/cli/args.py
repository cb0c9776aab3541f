"""Argument parsing shared by every subcommand: a bad command line is a user error (exit 1)."""

from __future__ import annotations

import argparse

from converter.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line is a UserError: one line and exit 1. (argparse's own
    exit 2 would read as a parity failure to a CI job.)"""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")
