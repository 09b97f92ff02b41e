"""Evaluation: FID / sFID / IS / precision-recall with the TF-Inception weights, and a small
classifier's Fréchet distance + accuracy for small grayscale datasets. See docs/evaluation.md.

Modules: ``metrics`` (formulas on features), ``images`` (sample / reference image sets),
``inception`` (the FID feature network), ``reference`` (feature extraction, cached reference
statistics), ``classifier`` (small-data feature network), ``run`` (the ``maskar eval`` pipeline).
"""
