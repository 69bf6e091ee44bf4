"""Defenses, one folder per lifecycle stage (alignment, fine-tuning, post-fine-tuning, runtime).

Importing this package registers the built-in defenses without importing torch.
"""

from tunesec.defenses.alignment import SafetySFT, SafetySFTConfig

__all__ = ["SafetySFT", "SafetySFTConfig"]
