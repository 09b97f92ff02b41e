"""Attention-kernel benchmark; see maskar/bench/attention.py (``--help`` for options)."""

import sys

from maskar.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
