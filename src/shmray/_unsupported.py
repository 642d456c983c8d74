"""Ray's names for what shmray does not do on one machine: other languages, Ray Client and
the dashboard.  Each is there so that ``import shmray as ray`` keeps a program
importable, and says what to do instead when it is called.

Runs in: the driver, workers and actors.
"""

from __future__ import annotations

import enum
import logging
from typing import NoReturn

# Ray's worker modes (``ray.SCRIPT_MODE`` ...), same values.
SCRIPT_MODE = 0
WORKER_MODE = 1
LOCAL_MODE = 2

_log = logging.getLogger("shmray")


class Language(enum.IntEnum):
    """The languages Ray's tasks may be written in; shmray runs Python only."""

    PYTHON = 0
    JAVA = 1
    CPP = 2


def _python_only(what: str) -> NoReturn:
    raise NotImplementedError(
        f"{what} calls Java or C++ code through Ray's cross-language support; shmray runs "
        "Python tasks and actors only. Run this program on Ray (ray.init(address=...)) to "
        "use other languages.")


def java_function(class_name: str, function_name: str):
    _python_only(f"java_function({class_name!r}, {function_name!r})")


def java_actor_class(class_name: str):
    _python_only(f"java_actor_class({class_name!r})")


def cpp_function(function_name: str):
    _python_only(f"cpp_function({function_name!r})")


def client(address=None, _deprecation_warn_enabled: bool = True):
    """Ray Client connects to a remote cluster; shmray runs on this machine only."""
    raise NotImplementedError(
        f"shmray.client({address!r}): Ray Client connects to a Ray cluster, and shmray runs "
        "on this machine only. Use ray.client() with Ray itself, or shmray.init() here.")


def show_in_dashboard(message: str, key: str = "", dtype: str = "text") -> None:
    """Ray shows ``message`` on the dashboard's page for this actor or task; shmray has no
    dashboard, so it goes to the "shmray" logger at debug level."""
    if dtype not in ("text", "html"):
        raise ValueError(f"dtype accepts only text or html, got {dtype!r}")
    _log.debug("show_in_dashboard[%s]: %s", key, message)
