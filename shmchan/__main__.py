"""``python -m shmchan``: the ``shmchan`` command line (``--help`` lists the commands).

``python -m shmchan bench [options]`` runs the benchmark, as ``shmchan bench`` does.
"""

from __future__ import annotations

import sys

from ._cli import main

__all__ = ("main",)

if __name__ == "__main__":
    sys.exit(main())
