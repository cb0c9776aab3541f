"""Exception families.

`UserError` is a problem with what the user asked for (a recipe, a path, a checkpoint): the CLI
prints it on one line and exits 1. `ParityFailure` means the artifact was built but is not faithful
enough to the original: exit 2. Anything else is a bug: traceback and exit 3.
"""


class UserError(Exception):
    """Bad input from the user: recipe, paths, checkpoint contents, command-line arguments."""

    exit_code = 1


class ParityFailure(Exception):
    """The converted model missed one or more parity thresholds.

    Attributes:
        failures: one human-readable line per missed threshold.
        report_dir: where the parity report was written for the user to read.
    """

    exit_code = 2

    def __init__(self, failures: list[str], report_dir: str):
        self.failures = failures
        self.report_dir = report_dir
        super().__init__(
            f"parity failed ({'; '.join(failures)}); nothing published, report in {report_dir}"
        )
