"""The connections of a server that wait for their next request, the longest waiting first.

A server that is full closes the connection that has waited longest to make room for a new
one (the peer server and the metrics server): a client that connects and says nothing then
holds a descriptor only until someone needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Waiting:
    def __init__(self) -> None:
        self._scopes: dict[trio.CancelScope, None] = {}

    def __len__(self) -> int:
        return len(self._scopes)

    @contextmanager
    def wait(self, seconds: float) -> Iterator[trio.CancelScope]:
        """``with waiting.wait(t) as cs:`` around the wait for a request: it ends after
        ``t`` seconds or when the connection is closed to make room
        (``cs.cancelled_caught`` either way)."""
        with trio.move_on_after(seconds) as cs:
            self._scopes[cs] = None
            try:
                yield cs
            finally:
                self._scopes.pop(cs, None)  # (gone already when closed to make room)

    def close_longest(self) -> bool:
        """End the longest wait; False if no connection waits.  It leaves the set at once:
        a burst of newcomers would otherwise all close the same connection, and all be let
        in."""
        if not self._scopes:
            return False
        oldest = next(iter(self._scopes))
        del self._scopes[oldest]
        oldest.cancel()
        return True
