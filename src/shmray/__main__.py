"""``python -m shmray``: the ``shmray`` command line (``_cli``).

Runs in: its own process.
"""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
