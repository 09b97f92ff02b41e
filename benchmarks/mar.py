"""MAR sampling throughput and training step time; see maskar/bench/mar.py (``--help`` for options)."""

import sys

from maskar.bench.mar import main

if __name__ == "__main__":
    sys.exit(main())
