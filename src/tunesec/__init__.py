"""tunesec: a security lab for the fine-tuning lifecycle of large language models.

The public Python API. Names load lazily, so ``import tunesec`` stays cheap (no torch until a model is used)::

    import tunesec
    report = tunesec.evaluate("smollm2-135m", task="harmfulness", dataset="advbench", limit=50)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    "ModelRef": "tunesec.models",
    "LoadedModel": "tunesec.models",
    "GenerationConfig": "tunesec.models",
    "load_model": "tunesec.models",
    "get_generator": "tunesec.models",
    "Example": "tunesec.data",
    "load_examples": "tunesec.data",
    "load_dataset_by_name": "tunesec.data",
    "evaluate": "tunesec.evals",
    "EvalReport": "tunesec.evals",
    "get_judge": "tunesec.judges",
    "JudgeInput": "tunesec.judges",
    "judge_file": "tunesec.evals.judge_file",
    "TrainConfig": "tunesec.training",
    "train": "tunesec.training",
    "TrainingHook": "tunesec.training",
    "attack": "tunesec.attacks.api",
    "defend": "tunesec.defenses",
    "finetune": "tunesec.service",
    "repair": "tunesec.defenses.post",
    "certify": "tunesec.certify",
    "run_matrix": "tunesec.matrix",
    "RunDir": "tunesec.store",
    "register": "tunesec.registry",
    "registry": "tunesec.registry",
    "UsageError": "tunesec.errors",
}

__all__ = [
    "__version__",
    "EvalReport",
    "Example",
    "GenerationConfig",
    "JudgeInput",
    "LoadedModel",
    "ModelRef",
    "RunDir",
    "TrainConfig",
    "TrainingHook",
    "UsageError",
    "attack",
    "certify",
    "defend",
    "evaluate",
    "finetune",
    "get_generator",
    "get_judge",
    "judge_file",
    "load_dataset_by_name",
    "load_examples",
    "load_model",
    "register",
    "registry",
    "repair",
    "run_matrix",
    "train",
]

if TYPE_CHECKING:
    from tunesec.data import Example, load_dataset_by_name, load_examples
    from tunesec.errors import UsageError
    from tunesec.evals import EvalReport, evaluate
    from tunesec.evals.judge_file import judge_file
    from tunesec.judges import JudgeInput, get_judge
    from tunesec.models import GenerationConfig, LoadedModel, ModelRef, get_generator, load_model
    from tunesec.registry import register, registry
    from tunesec.store import RunDir
    from tunesec.training import TrainConfig, TrainingHook, train


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'tunesec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
