"""An application's exported state as bytes, and back: plain data only (None, bool, int,
float, str, bytes, bytearray and lists, tuples, dicts, sets and frozensets of them), so
that what crosses between processes, and between code versions in an upgrade, is data
and never code. Pickle's format (protocol 5, fast and compact in C) with every class
refused both ways: nothing but plain data can be written, and nothing can be imported
or called while reading."""

from __future__ import annotations

import io
import pickle
from typing import Any

PROTOCOL = 5


class StateError(ValueError):
    """State that is not plain data, or bytes that are not such state."""


class _Writer(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # Called for everything but the plain built-in types: refuse it.
        raise StateError(f"state must be plain data (None, bool, int, float, str, bytes "
                         f"and lists, tuples, dicts, sets of them), not {type(obj).__name__}")


class _Reader(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise StateError(f"state names a class ({module}.{name}): not plain data")


def dumps(state: Any) -> bytes:
    """The bytes of `state`; b"" for None (nothing to carry)."""
    if state is None:
        return b""
    out = io.BytesIO()
    try:
        _Writer(out, PROTOCOL).dump(state)
    except RecursionError:
        raise StateError("state nests too deep") from None
    except (pickle.PicklingError, TypeError) as e:
        raise StateError(f"state cannot be written: {e}") from None
    return out.getvalue()


def loads(data: bytes) -> Any:
    """The state of dumps()'s bytes; None for b""."""
    if not data:
        return None
    try:
        return _Reader(io.BytesIO(data)).load()
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed input is one error to the caller
        raise StateError(f"state cannot be read: {e!r}") from None
