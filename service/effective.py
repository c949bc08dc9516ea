"""The settings each running role actually uses, recorded in Redis: one source for every number shown.

``ctp status``, ``GET /status`` and the dashboard run in other processes with their own
environment, so their defaults (``CTP_MEMORY_SIZE``...) may not be the trainer's. Each role
records what it runs with at start (``record``: JSON in ``ctp:settings:{role}``, with its pid,
host and start time) and the readers show those (``recorded``), falling back to their own
settings only for a role that has recorded nothing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

KEY = "ctp:settings:{role}"
ROLES = ("ingest", "trainer")
# what each role records from its Settings (plus what it computes itself)
FIELDS = {
    "ingest": ("topic", "dlq_topic", "chunk_size", "chunk_max_wait_s", "consumer_group"),
    "trainer": (
        "model",
        "pretrained",
        "strategy",
        "memory_size",
        "memory_max_bytes",
        "memory_policy",
        "epochs",
        "chunk_size",
        "epochs_follow_chunk_size",
        "batch_size",
        "lr",
        "device",
        "keep_checkpoints",
    ),
}


def record(client, role: str, settings, **extra: Any) -> dict[str, Any]:
    """Write ``role``'s effective settings (the ``FIELDS`` of ``settings`` and ``extra``)."""
    values = {f: getattr(settings, f) for f in FIELDS[role] if hasattr(settings, f)}
    values = {
        k: (str(v) if not isinstance(v, int | float | str | bool | type(None)) else v)
        for k, v in values.items()
    }
    doc = {**values, **extra, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    client.set(KEY.format(role=role), json.dumps(doc))
    return doc


def recorded(client) -> dict[str, dict[str, Any]]:
    """``{role: settings}`` of the roles that recorded theirs."""
    out = {}
    for role, raw in zip(ROLES, client.mget([KEY.format(role=r) for r in ROLES]), strict=True):
        if raw:
            try:
                out[role] = json.loads(raw)
            except ValueError:
                continue
    return out
