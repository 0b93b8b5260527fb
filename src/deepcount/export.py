"""(being written) `deepcount export`."""


def add_command(subparsers) -> None:
    """Register the `export` subcommand on the `deepcount` parser."""
