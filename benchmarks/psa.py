"""CASMAR Proximal Self-Attention benchmark; see maskar/bench/psa.py (``--help`` for options)."""

import sys

from maskar.bench.psa import main

if __name__ == "__main__":
    sys.exit(main())
