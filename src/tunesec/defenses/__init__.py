"""Defenses, one folder per lifecycle stage (alignment, fine-tuning, post-fine-tuning, runtime).

Importing this package registers the built-in defenses without importing torch. :mod:`tunesec.defenses.base`
holds what they share and :func:`defend`, the Python form of ``tunesec defend``.
"""

from tunesec.defenses.alignment import SafetySFT, SafetySFTConfig
from tunesec.defenses.base import STAGES, defend, get_defense

__all__ = ["STAGES", "SafetySFT", "SafetySFTConfig", "defend", "get_defense"]
