"""The one fine-tuning engine (LoRA or full) with a hooks API for defenses and adaptive attacks.

Importing this package does not import torch: :func:`train` and the result types load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunesec.training.config import TrainConfig
from tunesec.training.hooks import ExtraBatch, HookContext, TrainingHook

if TYPE_CHECKING:
    from tunesec.training.engine import TrainMetrics, TrainResult, train

__all__ = ["ExtraBatch", "HookContext", "TrainConfig", "TrainMetrics", "TrainResult", "TrainingHook", "train"]

_LAZY = {"train", "TrainResult", "TrainMetrics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from tunesec.training import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tunesec.training' has no attribute {name!r}")
