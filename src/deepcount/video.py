"""(being written) `deepcount video`."""


def add_command(subparsers) -> None:
    """Register the `video` subcommand on the `deepcount` parser."""
