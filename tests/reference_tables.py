"""Where the tests find the official state-dict key / shape tables.

Copies of the project's reference tables (shared/reference/*.json: key names and shapes of
the official checkpoints, facts to match) live in tests/data/reference, so the strict-load
tests run on any clean clone, CI included.
"""

from pathlib import Path

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
