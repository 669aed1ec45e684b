"""The SQLite ledger's helper thread: runs what must not block the event loop, one call at a time.

COMMIT (the fsync), a ``BEGIN IMMEDIATE`` that waits for another process, opening and closing the
connection. It replaces a one-worker ``concurrent.futures.ThreadPoolExecutor`` with
``loop.run_in_executor``, which did the same thing at about twice the event loop's CPU per trip:
``submit`` takes a lock and builds a work item and a concurrent future, ``wrap_future`` chains an
asyncio future to it with callbacks on both sides, and the worker's result crosses back through
them. Here a call is one ``SimpleQueue.put`` (C) on the loop's side and one
``call_soon_threadsafe`` on the thread's side (about 36 against 72-87 µs of event-loop CPU per trip
on a 2-core VM, ``docs/performance.md``, series 8). A group commit makes one trip per group, so
this is per group, not per request: it counts most at low load, where groups are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: (function, its arguments, the future its outcome goes to); None stops the thread
_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class LedgerThread:
    """One daemon thread serving calls in order. :meth:`run` must be called on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # A daemon: a ledger nobody closed must not keep the interpreter from exiting. Exiting during
        # a COMMIT is what a crash is to SQLite (the WAL is crash-safe), and nothing was answered
        # for that commit: answers wait for it to return.
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the thread, after every call made before; the future gets its value or
        its exception (any ``BaseException``, as ``run_in_executor`` passes them)."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((fn, args, future))
        return future

    def stop(self) -> None:
        """Let the calls already made finish, then end the thread and wait for it (blocking)."""
        self._calls.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, args, future = call
            try:
                value, error = fn(*args), None
            except BaseException as exc:  # the caller's to handle, as with run_in_executor
                value, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(resolve, future, value, error)


def resolve(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Give ``future`` its outcome, unless its awaiting caller was cancelled meanwhile."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
