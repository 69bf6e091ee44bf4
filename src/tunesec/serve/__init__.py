"""``tunesec serve``: a guarded OpenAI-compatible server in front of a local model or an upstream endpoint.

Layers around the model, each configured in ``serve.yaml`` (:class:`~tunesec.serve.config.ServeConfig`) and
reported per request in the audit log:

- :mod:`~tunesec.serve.auth`: bearer API keys stored as SHA-256 hashes, per-key rate limits;
- :mod:`~tunesec.serve.guards`: input and output guards on a judge (fail-closed on error or timeout), the
  enforced system prompt, the secret safety prompt applied server-side and filtered from answers;
- :mod:`~tunesec.serve.audit`: one JSONL line per request, whole-line appends, rotation by size;
- :mod:`~tunesec.serve.batching` (the local engine behind a dynamic-batching queue) and
  :mod:`~tunesec.serve.upstream` (any OpenAI-compatible URL, with timeouts and retries);
- :mod:`~tunesec.serve.app`: the FastAPI app (``/v1/chat/completions`` with SSE streaming, ``/v1/models``,
  ``/healthz``, ``/metrics``), errors in OpenAI's shape.

Nothing here is imported by ``tunesec --help``; FastAPI and torch load when the command runs.
"""
