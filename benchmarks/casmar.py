"""CASMAR sampling throughput; see maskar/bench/casmar.py (``--help`` for options)."""

import sys

from maskar.bench.casmar import main

if __name__ == "__main__":
    sys.exit(main())
