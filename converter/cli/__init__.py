"""Command line: `convert.py` and its subcommands (`main`), the `targets` listing (`targets`), and
the argument parser they share (`args`)."""
