"""The defenses x attacks matrix (docs/MATRIX.md).

Every (defense, attack, seed) cell is defended, attacked and measured, cached by content hash, resumable, run
locally or as Ray tasks; a card per defense says whether it holds.
"""

from tunesec.matrix.config import EvalSpec, MatrixConfig
from tunesec.matrix.runner import run_matrix

__all__ = ["EvalSpec", "MatrixConfig", "run_matrix"]
