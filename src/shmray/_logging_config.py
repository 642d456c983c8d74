"""``shmray.LoggingConfig``: how the session logs, passed as ``init(logging_config=...)``,
as Ray's.

Runs in: the driver.

shmray logs through the standard ``logging`` module, under the "shmray" logger; the config
sets that logger's level (Ray's ``log_level``) and the format of what it prints
(``encoding``: "TEXT", or "JSON" for one JSON object per line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence

_ENCODINGS = ("TEXT", "JSON")


@dataclasses.dataclass
class LoggingConfig:
    """Ray's ``ray.LoggingConfig``."""

    encoding: str = "TEXT"
    log_level: str = "INFO"
    additional_log_standard_attrs: Sequence[str] = ()

    def __post_init__(self):
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"Invalid encoding type: {self.encoding}. Valid encoding types "
                             f"are: {list(_ENCODINGS)}")
        if logging.getLevelName(self.log_level) == f"Level {self.log_level}":
            raise ValueError(f"Invalid log level: {self.log_level!r}; use one of DEBUG, "
                             "INFO, WARNING, ERROR, CRITICAL")

    def _apply(self) -> None:
        """Set up the "shmray" logger of this process (and of those it forks)."""
        logger = logging.getLogger("shmray")
        logger.setLevel(self.log_level)
        handler = logging.StreamHandler()
        handler.setFormatter(_JsonFormatter(self.additional_log_standard_attrs)
                             if self.encoding == "JSON" else
                             logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- "
                                               "%(message)s"))
        for old in [h for h in logger.handlers if getattr(h, "_shmray_config", False)]:
            logger.removeHandler(old)
        handler._shmray_config = True
        logger.addHandler(handler)


class _JsonFormatter(logging.Formatter):
    def __init__(self, extra_attributes: Sequence[str]):
        super().__init__()
        self.extra_attributes = tuple(extra_attributes)

    def format(self, record: logging.LogRecord) -> str:
        entry = {"asctime": self.formatTime(record), "levelname": record.levelname,
                 "message": record.getMessage(), "filename": record.filename,
                 "lineno": record.lineno}
        for name in self.extra_attributes:
            entry[name] = getattr(record, name, None)
        if record.exc_info:
            entry["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
