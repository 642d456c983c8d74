"""GPUs: which the session has, and which a task or actor may see.

Runs in: the driver (``init`` finds the session's GPUs), workers and actors (each sets
``CUDA_VISIBLE_DEVICES`` to what it was given).

The session's GPUs are ids, as CUDA names them.  ``init(num_gpus=N)`` takes the first N of
those ``CUDA_VISIBLE_DEVICES`` lists when the driver has it set (more than it lists is an
error), else ``"0"`` ... ``"N-1"``; without ``num_gpus``, the session has every GPU
``CUDA_VISIBLE_DEVICES`` lists, else those ``nvidia-smi -L`` counts, else none.  The
scheduler hands ids out (``_scheduler.gpu_ids``); a task or actor finds its own in
``CUDA_VISIBLE_DEVICES``, and from ``get_gpu_ids()``.

Ray's rules, kept here: a task or actor that asked for no GPU sees ``CUDA_VISIBLE_DEVICES``
empty (no GPU at all), so it can't take one from those that did, unless
``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`` (then it sees what the driver had); a task sees its
ids from its start to its end, an actor for its whole life (it may change the variable
afterwards); ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` leaves the variable alone
everywhere.  Both are read from the driver's environment, which every process inherits.
``get_gpu_ids()`` gives ints, or the strings ``CUDA_VISIBLE_DEVICES`` listed when it was
set at ``init`` (they may be UUIDs).  Each
process sets the variable once as it starts, and then only around a task that holds GPUs:
nothing is done per task for tasks that hold none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import List, Optional, Sequence, Tuple

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
OVERRIDE_ON_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"
_NVIDIA_SMI_TIMEOUT = 10.0  # seconds; a wedged driver must not hang init

_inherited: Optional[str] = None  # the variable as this process got it (``start``)


def visible_devices(environ=os.environ) -> Optional[List[str]]:
    """The ids ``CUDA_VISIBLE_DEVICES`` lists, or None where it is not set.  Empty, or
    ``NoDevFiles`` (what some schedulers set on a machine without GPUs): no GPU."""
    value = environ.get(CUDA_VISIBLE_DEVICES)
    if value is None:
        return None
    if value.strip() in ("", "NoDevFiles"):
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def nvidia_smi_count() -> int:
    """How many GPUs ``nvidia-smi -L`` lists; 0 where it is missing or fails."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return 0
    try:
        listing = subprocess.run([program, "-L"], capture_output=True, text=True,
                                 timeout=_NVIDIA_SMI_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def session_gpus(num_gpus, environ=os.environ) -> Tuple[List[str], bool]:
    """(the session's GPU ids, whether ``CUDA_VISIBLE_DEVICES`` named them) for ``init``'s
    ``num_gpus`` (None: as many as there are)."""
    visible = visible_devices(environ)
    if num_gpus is None:
        if visible is not None:
            return visible, True
        return [str(i) for i in range(nvidia_smi_count())], False
    if num_gpus != int(num_gpus):
        raise ValueError(f"num_gpus must be a whole number of GPUs, got {num_gpus!r}")
    count = int(num_gpus)
    if visible is None:
        return [str(i) for i in range(count)], False
    if count > len(visible):
        raise ValueError(
            f"init(num_gpus={num_gpus!r}) asks for more GPUs than CUDA_VISIBLE_DEVICES="
            f"{environ.get(CUDA_VISIBLE_DEVICES)!r} makes visible ({len(visible)}). Pass "
            f"num_gpus={len(visible)} or fewer, or list more GPUs in CUDA_VISIBLE_DEVICES "
            "(or unset it) before init.")
    return visible[:count], True


def start(gpu_ids: Sequence[str] = ()) -> None:
    """As a worker or actor starts: show it ``gpu_ids`` (its own for life, an actor's)."""
    global _inherited
    _inherited = os.environ.get(CUDA_VISIBLE_DEVICES)
    make_visible(gpu_ids)


def make_visible(gpu_ids: Sequence[str]) -> None:
    """Show this process ``gpu_ids`` alone (none: no GPU), unless the user said not to."""
    if os.environ.get(NOSET):
        return
    if gpu_ids or _true(os.environ.get(OVERRIDE_ON_ZERO, "1")):
        os.environ[CUDA_VISIBLE_DEVICES] = ",".join(gpu_ids)
    elif _inherited is None:
        os.environ.pop(CUDA_VISIBLE_DEVICES, None)
    else:
        os.environ[CUDA_VISIBLE_DEVICES] = _inherited


def _true(value: str) -> bool:
    return value.lower() in ("1", "true")  # as Ray reads its boolean variables


def as_returned(gpu_ids: Sequence[str], named: bool) -> list:
    """``get_gpu_ids()``'s answer: the ids as ints, or as the strings
    ``CUDA_VISIBLE_DEVICES`` named at ``init`` (``named``)."""
    return list(gpu_ids) if named else [int(gpu_id) for gpu_id in gpu_ids]
