"""Log lines that carry the id of the request they belong to."""

from __future__ import annotations

import contextvars
import logging

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def configure_logging(level: str) -> None:
    """Log at `level`, each line with the request id it belongs to."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(_add_request_id)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _add_request_id(record: logging.LogRecord) -> bool:
    record.request_id = request_id.get()
    return True
