"""Logging set-up for the daemons: structlog with bound context, to stderr.

Loggers are bound with ``migration``, ``channel`` and ``device`` keys where those
apply.  ``--trace-packets`` turns on one debug line per packet on every channel; the
hot paths check :data:`TRACE.packets` (a plain attribute read) before formatting.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "TRACE", "get_logger"]


class _Trace:
    packets = False


TRACE = _Trace()


def configure_logging(level: str = "info", *, json: bool = False,
                      trace_packets: bool = False) -> None:
    """Route structlog to stderr at ``level``; ``trace_packets`` implies debug."""
    TRACE.packets = trace_packets
    if trace_packets:
        level = "debug"
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"unknown log level {level!r}: use debug, info, warning or error")
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str, **context: object) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(**context)  # type: ignore[no-any-return]
