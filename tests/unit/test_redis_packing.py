"""HiredisPackingConnection packs commands byte for byte as redis-py's own connection does."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from drm_taskiq.redis_queue import HiredisPackingConnection

CASES: list[tuple[Any, ...]] = [
    ("PING",),
    (
        "EVALSHA",
        "a" * 40,
        1,
        "{p:q}:job:x",
        "{p:q}",
        "x",
        1795884594764,
        0,
        -3,
        "msg",
        b"\x00\xff" * 300,
    ),
    ("SET", "k", "caf\u00e9 \u2603 \U0001f600", "PX", 2000),
    ("BLPOP", "{p:q}:marker", 0.25),
    ("ZADD", "z", 1e20, "m", 0.1, "n", 2**70, "o"),
    ("CONFIG GET", "maxmemory"),  # a command name with a space: split by redis-py
    ("HSET", "h", "f", bytearray(b"ba"), "g", memoryview(b"mv")),
]


@pytest.mark.parametrize("args", CASES, ids=lambda args: str(args[0]))
def test_packing_matches_redis_py(args: tuple[Any, ...]) -> None:
    ours = b"".join(HiredisPackingConnection().pack_command(*args))
    theirs = b"".join(Connection().pack_command(*args))
    assert ours == theirs


@pytest.mark.parametrize("bad", [True, None, object()])
def test_arguments_redis_py_refuses_are_refused_alike(bad: Any) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        HiredisPackingConnection().pack_command("SET", "k", bad)
