"""Command line: ``python -m shmchan bench [options]`` (``--help`` lists them)."""

from __future__ import annotations

import sys

USAGE = "usage: python -m shmchan bench [--quick] [--repeat N] [--json PATH] [--plot PATH] [--help]"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "bench":
        print(f"unknown command {argv[0]!r}; try: python -m shmchan bench", file=sys.stderr)
        return 2
    from ._bench import main as bench

    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
