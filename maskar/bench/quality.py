"""``maskar bench quality``: the quality study runner (:mod:`maskar.eval.study`).

    maskar bench quality plan=PLAN.yaml out=DIR classifier=DIR ckpt.NAME=DIR ... [scale=1.0]
"""

from __future__ import annotations

from maskar.eval.study import USAGE, main

__all__ = ["USAGE", "main"]
