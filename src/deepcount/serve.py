"""(being written) `deepcount serve`."""


def add_command(subparsers) -> None:
    """Register the `serve` subcommand on the `deepcount` parser."""
