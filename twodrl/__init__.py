"""twodrl: alignment of LLMs with fine-grained, multi-aspect (2D) preferences.

This package is the pure core (data, segmentation, aspects, losses, masks, models,
config). It never imports Ray; the actors in ``actors/`` and the jobs in ``jobs/``
wrap it.
"""

__version__ = "0.1.0"
