"""``python -m pympx_queues``: the ``pympx-queues`` command line."""

from .cli import PROG, main

if __name__ == "__main__":  # pragma: no cover - run by ``python -m``
    main(prog_name=PROG)
