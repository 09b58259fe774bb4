"""Ledger entries as tests write them to the stream."""

from __future__ import annotations

import json
import time
from typing import Any


def ledger_entry(
    job_id: str, *, tenant: str = "acme", at_ms: int | None = None, **fields: Any
) -> str:
    """The JSON text of a ledger entry as finish.lua writes it: a completed attempt of plugin
    ``testp``'s job ``work`` at ``at_ms`` (now by default), unless ``fields`` say otherwise."""
    now = str(int(time.time() * 1000) if at_ms is None else at_ms)
    body: dict[str, Any] = {
        "id": job_id, "plugin": "testp", "tenant": tenant, "job": "work", "ts": now,
        "started": now, "at": now, "attempt": 1, "status": "success", "state": "completed",
        "final": 1, "outcome": "completed", "value": "null", "extra": "{}", "gen": 0,
    }  # fmt: skip
    body.update(fields)
    return json.dumps(body)
