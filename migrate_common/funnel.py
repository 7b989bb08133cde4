"""The failure funnel: one per migration, the first error wins and cancels the rest.

Every task of a migration (channel senders and receivers, device save and load
tasks, the return-path reader, the orchestrator itself) is started through
:meth:`Funnel.spawn`.  When any of them raises, the funnel records that first
exception (later ones are logged, not recorded), cancels every other task in one
place and wakes whoever waits in :meth:`Funnel.wait_failed`.  Cancellation is never
treated as an error and never swallowed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from protocol.errors import MigrationError

__all__ = ["Funnel", "describe"]


def describe(exc: BaseException) -> str:
    """A one-line, operator-readable description of an error."""
    if isinstance(exc, MigrationError):
        return str(exc)
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by peer ({exc.strerror or exc})"
    if isinstance(exc, BrokenPipeError):
        return "connection closed by peer (broken pipe)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Funnel:
    """Collects the tasks of one migration and the first error among them."""

    def __init__(self, log: Any = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.error: BaseException | None = None
        self._failed = asyncio.Event()
        self._log = log or structlog.get_logger("funnel")
        self._closed = False

    @property
    def failed(self) -> bool:
        return self.error is not None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise RuntimeError("funnel is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_done)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.fail(exc, source=task.get_name())

    def fail(self, exc: BaseException, source: str = "") -> None:
        """Record ``exc`` if it is the first error, then cancel every task."""
        if self.error is None:
            self.error = exc
            self._log.warning("migration failed", error=describe(exc), source=source,
                              error_type=type(exc).__name__)
            self._failed.set()
            self.cancel_all()
        else:
            self._log.debug("later error ignored", error=describe(exc), source=source)

    def cancel_all(self) -> None:
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()

    async def wait_failed(self) -> BaseException:
        await self._failed.wait()
        assert self.error is not None
        return self.error

    async def close(self) -> None:
        """Cancel every task still running and wait until all have finished."""
        self._closed = True
        self.cancel_all()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def run_to_end(self, coro: Coroutine[Any, Any, Any], name: str, *,
                         succeeded: Callable[[], Awaitable[None]],
                         failed: Callable[[], Awaitable[None]],
                         shutting_down: BaseException) -> None:
        """Run a migration's main task to its end, then ``succeeded()`` or, when it or
        any other task failed or was cancelled, ``failed()``.  Cancelled from outside
        (the daemon shuts down): record ``shutting_down`` as the failure, run
        ``failed()`` and re-raise the cancellation."""
        task = self.spawn(coro, name)
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            self.fail(shutting_down)
            await failed()
            raise
        if task.cancelled() or task.exception() is not None or self.failed:
            await failed()
        else:
            await succeeded()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
