"""The SQLite ledger's helper thread: calls run in order, off the event loop, and their outcome
(value or exception) reaches the awaiting caller; a cancelled caller or a closed loop costs nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.adapters.ledger_thread import LedgerThread


async def test_calls_run_in_order_on_the_thread_and_return_their_values() -> None:
    thread = LedgerThread(asyncio.get_running_loop(), "test-ledger")
    try:
        seen: list[tuple[int, str]] = []

        def call(number: int) -> int:
            seen.append((number, threading.current_thread().name))
            return number * 10

        futures = [thread.run(call, number) for number in range(20)]
        assert await asyncio.gather(*futures) == [number * 10 for number in range(20)]
        assert seen == [(number, "test-ledger") for number in range(20)]
        assert threading.current_thread().name != "test-ledger"
    finally:
        thread.stop()


async def test_an_exception_reaches_the_caller_and_the_thread_keeps_serving() -> None:
    thread = LedgerThread(asyncio.get_running_loop(), "test-ledger")
    try:

        def fail() -> None:
            raise ValueError("disk on fire")

        with pytest.raises(ValueError, match="disk on fire"):
            await thread.run(fail)

        class Interrupted(BaseException):
            pass

        def interrupt() -> None:
            raise Interrupted

        with pytest.raises(Interrupted):  # not only Exception: as run_in_executor passes them
            await asyncio.wait_for(thread.run(interrupt), 5)
        assert await thread.run(lambda: "still here") == "still here"
    finally:
        thread.stop()


async def test_a_cancelled_caller_does_not_stop_the_call_or_the_thread() -> None:
    thread = LedgerThread(asyncio.get_running_loop(), "test-ledger")
    try:
        started, release, finished = threading.Event(), threading.Event(), threading.Event()

        def slow() -> str:
            started.set()
            assert release.wait(5)
            finished.set()
            return "done"

        waiter = asyncio.ensure_future(thread.run(slow))
        assert await asyncio.to_thread(started.wait, 5)
        waiter.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await thread.run(lambda: 42) == 42  # ran after the slow call had finished
        assert finished.is_set()
    finally:
        thread.stop()


async def test_stop_lets_the_calls_already_made_finish() -> None:
    thread = LedgerThread(asyncio.get_running_loop(), "test-ledger")
    done: list[int] = []
    release = threading.Event()
    thread.run(lambda: release.wait(5))
    for number in range(5):
        thread.run(done.append, number)
    release.set()
    thread.stop()
    assert done == [0, 1, 2, 3, 4]
    assert not thread._thread.is_alive()


def test_a_call_finishing_after_its_loop_closed_does_not_kill_the_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = LedgerThread(loop, "test-ledger")
    release = threading.Event()
    ran: list[str] = []
    thread.run(lambda: release.wait(5))
    thread.run(ran.append, "after")
    loop.close()
    release.set()  # both calls now answer to a closed loop
    thread.stop()
    assert ran == ["after"]
