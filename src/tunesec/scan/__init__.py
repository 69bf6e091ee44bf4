"""Artifact scan: inspect weights, adapters, GGUF files and chat templates before they are loaded or trusted.

``tunesec scan PATH`` (:func:`scan`) reads a model directory, an adapter directory, a ``.gguf``, a
``.safetensors`` or a pickle checkpoint without loading it: pickle opcodes (:mod:`.pickles`), safetensors headers
(:mod:`.safetensors_header`) and tensor names against the claimed architecture (:mod:`.architecture`), GGUF
headers (:mod:`.gguf_file`), chat templates in the sandbox (:mod:`.templates`), adapters (:mod:`.adapters`) and
provenance (:mod:`.provenance`). docs/SCAN.md lists what is checked and what is not.
"""

from __future__ import annotations

from tunesec.scan.findings import SEVERITIES, Finding
from tunesec.scan.runner import ScanResult, scan

__all__ = ["SEVERITIES", "Finding", "ScanResult", "scan"]
