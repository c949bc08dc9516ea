"""The serving side: registry (or a checkpoint dir) -> the served model -> HTTP.

- ``sources``: where versions come from (the registry's pointer and pub/sub, or a checkpoint dir).
- ``holder``: the watcher that loads a version whole and swaps it in (``ModelHolder``).
- ``snapshot``: one loaded version, immutable (``Snapshot``), and the label embedding cache.
- ``gallery``: the retrieval gallery: its directories, item ids, index and thumbnails.
- ``batching``, ``telemetry``, ``dashboard``: request batching, Prometheus metrics, the page's data.
- ``api``: the FastAPI app and ``ctp serve``.
"""
