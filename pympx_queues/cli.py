"""The ``pympx-queues`` command line (click).  Thin: each command parses arguments, calls
one library function and prints.  Exit codes: 0 ok, 1 problem found, 2 usage error."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pympx_queues")
def main() -> None:
    """Inspect, requeue and repair pympx_queues folder queues and pickup journals."""


if __name__ == "__main__":  # pragma: no cover
    main()
