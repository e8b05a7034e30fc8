"""Log output of the service: `text` (the default) or `json` lines (`CHATSESSIONS_LOG_FORMAT`).

`configure_logging` runs when the lifespan starts (never at import) and puts one
handler on the `chatsessions` logger, replacing the one it put there before; it
queues records to a writer thread, so a log line costs the event loop a queue put,
not its formatting and write. Every record written while a request runs carries
that request's id.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from datetime import UTC, datetime
from typing import Any

from chatsessions.api.access import REQUEST_ID
from chatsessions.config import LogFormat, Settings

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread as they are: formatting and I/O happen there, not on the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class ServiceLogging:
    """The handler `configure_logging` puts on the `chatsessions` logger, and its writer thread."""

    def __init__(self, settings: Settings) -> None:
        output = logging.StreamHandler(sys.stderr)
        if settings.log_format == LogFormat.json:
            output.setFormatter(JsonFormatter())
        else:
            output.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self.handler = _QueueHandler(records)
        self.handler.addFilter(RequestIdFilter())  # here: the request's context is the caller's
        self.listener = logging.handlers.QueueListener(records, output)

    def close(self) -> None:
        logging.getLogger("chatsessions").removeHandler(self.handler)
        self.listener.stop()  # writes what is queued, then ends the thread


def configure_logging(settings: Settings) -> ServiceLogging:
    """Install the service's handler on the `chatsessions` logger; `close()` it at shutdown."""
    logger = logging.getLogger("chatsessions")
    for handler in [h for h in logger.handlers if isinstance(h, _QueueHandler)]:
        logger.removeHandler(handler)
    service = ServiceLogging(settings)
    service.listener.start()
    logger.addHandler(service.handler)
    logger.setLevel(settings.log_level.upper())
    return service
