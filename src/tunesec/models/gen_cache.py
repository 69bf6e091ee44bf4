"""Generations cached on disk by content, for data that tunesec builds from a model's own answers.

Building an alignment mix asks the model being aligned for a thousand greedy answers (self-distilled helpful
answers, the harmful prefixes of deep alignment): about 15 minutes on 2 CPU cores for SmolLM2-135M. The mix
itself is cached by its whole config, so a recipe that changes any mix field (``deep_alignment``, a refusal
filter) used to generate the same answers again. :class:`CachedGenerator` keys each ``generate`` call on what
decides its output: the model's weight hashes (:func:`~tunesec.models.fingerprint.fingerprint`, base and adapter)
with its tokenizer and chat-template files, the generation settings and the prompts. A hit returns the stored
generations without loading the model; a miss loads it once, generates and stores the result atomically under
``$TUNESEC_HOME/generations/<key>.json``.

Only local weights are cached: an endpoint (whose model can change behind its URL) or a spec without weight
files is passed straight through. Sampled decoding is cached too, since its seed is part of the settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesec.models.ref import ModelRef
from tunesec.models.types import Generation, GenerationConfig, Prompt

# raised when tunesec's generation changes what it returns for the same inputs, so older entries are not read
CACHE_FORMAT = 1
# files beside the weights that change what a prompt becomes (tokens, chat template)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


class CachedGenerator:
    """A generator for ``model`` whose results are cached by content (module docstring); loads lazily."""

    def __init__(self, model: ModelRef | str, *, cache_dir: Path | None = None, **generator_kwargs: Any) -> None:
        from tunesec.paths import tunesec_home

        self.ref = ModelRef.parse(model) if isinstance(model, str) else model
        self.name = self.ref.name
        self.cache_dir = cache_dir if cache_dir is not None else tunesec_home() / "generations"
        self._kwargs = generator_kwargs
        self._generator: Any = None
        self._identity: dict[str, Any] | None = None
        self.hits = 0

    def identity(self) -> dict[str, Any] | None:
        """The hashes that name this model in cache keys; None when there is nothing local to hash.

        Weights (base and adapter), and the tokenizer and chat-template files beside them, which decide the
        prompt's tokens.
        """
        if self._identity is None and not self.ref.is_endpoint:
            from tunesec.models.fingerprint import file_sha256, fingerprint
            from tunesec.models.loading import resolve_alias

            fp = fingerprint(self.ref)
            if fp.get("weights_sha256") and (not self.ref.adapter or fp.get("adapter_sha256")):
                ids = {k: fp[k] for k in ("weights_sha256", "adapter_sha256") if fp.get(k)}
                concrete = resolve_alias(self.ref)
                for label, where in (("base", concrete.base), ("adapter", concrete.adapter)):
                    folder = Path(where) if where else None
                    if folder is not None and folder.is_dir():
                        for name in TOKENIZER_FILES:
                            if (folder / name).is_file():
                                ids[f"{label}/{name}"] = file_sha256(folder / name)
                self._identity = ids
        return self._identity

    def key(self, prompts: Sequence[Prompt], config: GenerationConfig) -> str | None:
        """The cache key of one call, or None when the model cannot be identified by its weights."""
        ids = self.identity()
        if ids is None:
            return None
        blob = json.dumps(
            {"format": CACHE_FORMAT, "model": ids, "config": config.model_dump(mode="json"), "prompts": list(prompts)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def generator(self) -> Any:
        """The real generator, loaded on first use."""
        if self._generator is None:
            from tunesec.models import get_generator

            self._generator = get_generator(self.ref, **self._kwargs)
        return self._generator

    def generate(
        self, prompts: Sequence[Prompt], config: GenerationConfig | None = None, *, progress: bool = True
    ) -> list[Generation]:
        """The model's generations for ``prompts``, from the cache when this exact call was made before."""
        from tunesec.store.atomic import atomic_write_text

        cfg = config or GenerationConfig()
        key = self.key(prompts, cfg) if prompts else None
        path = self.cache_dir / f"{key}.json" if key else None
        if path is not None and path.is_file():
            try:
                stored = [Generation.model_validate(g) for g in json.loads(path.read_text(encoding="utf-8"))]
            except (OSError, ValueError):
                stored = []  # unreadable entry: generate again and overwrite it
            if len(stored) == len(prompts):
                self.hits += 1
                return stored
        out = self.generator().generate(prompts, cfg, progress=progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps([g.model_dump(mode="json") for g in out]))
        return list(out)
