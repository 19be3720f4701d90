"""What a log line looks like, in every process of the gateway.

`SLUICE_LOG_FORMAT=text` (default): `time LEVEL logger: message key=value ...`;
`json`: one JSON object per line, `{"time", "level", "logger", "message", ...extra
fields}` (an exception's traceback goes in `exc`). The extra fields are whatever the call
passed as `extra=` (the access log's request id, route, status...), in both formats.

`configure(settings)` installs the handler in run.py's process (uvicorn's loggers
propagate to it: run.py gives uvicorn no logging config of its own).
`actor_log_defs(settings)` is the same configuration for Thespian: the actors forward
their records to Thespian's admin (its logger: patches/thespian_admin_logs.py), which
writes them with these formatters to the stderr it inherited from run.py, so the actors'
lines have the same shape.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from types import TracebackType

from protocols.gateway_settings import Settings

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_HIDDEN = {"color_message"}  # uvicorn's ANSI-coloured copy of the message

# Libraries that log secrets below INFO: hpack logs every HTTP/2 header it encodes at
# DEBUG, API keys included. Their records below INFO are dropped whatever the level.
QUIET_LIBRARIES = ("hpack", "h2")


def extra_fields(record: logging.LogRecord) -> dict:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in _HIDDEN and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(extra_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # a record forwarded from another process keeps only the text
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in extra_fields(record).items() if v is not None)
        if not extras:
            return text
        head, newline, rest = text.partition("\n")  # the fields stay on the message's line
        return f"{head} {extras}{newline}{rest}"


class QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or record.name.partition(".")[0] not in QUIET_LIBRARIES


FORMATTERS = {"json": JsonFormatter, "text": TextFormatter}


def configure(settings: Settings) -> None:
    """This process's logging: one stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(FORMATTERS[settings.log_format]())
    handler.addFilter(QuietLibraries())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LIBRARIES:  # not even formatted
        logging.getLogger(name).setLevel(max(logging.INFO, root.level))
    logging.captureWarnings(True)  # warnings.warn lines take the same shape
    if settings.log_format == "json":
        sys.excepthook = _log_uncaught


def actor_log_defs(settings: Settings) -> dict:
    """Thespian's `logDefs`: the same handler in its logger (the admin). The actors forward
    records at this level and above, each one a message to the admin, so they
    never go below INFO (DEBUG applies to run.py's process only)."""
    level = max(logging.INFO, logging.getLevelName(settings.log_level.upper()))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": f"{__name__}.{FORMATTERS[settings.log_format].__name__}"}},
        "filters": {"quiet_libraries": {"()": f"{__name__}.QuietLibraries"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "sluice",
                "filters": ["quiet_libraries"],
            }
        },
        "root": {"level": logging.getLevelName(level), "handlers": ["stderr"]},
    }


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("sluice").critical("uncaught exception", exc_info=(kind, value, tb))
