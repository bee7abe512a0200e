"""Restarts by torchrun's elastic agent: a restarted group resumes its own run by itself.

``torchrun --max-restarts K`` restarts every process of the job when one fails (a lost
node, a SIGKILL), up to K times, with the same command line and
``TORCHELASTIC_RESTART_COUNT`` = 1, 2, ... A restarted ``demul-fast train`` must continue
the run its first attempt started, not start it again (nor, with ``--overwrite``, replace
it). ``identity()`` is recorded in the run's ``run.json`` when the run is written;
``resumes_own_run`` tells a restarted process whether the run folder holds a checkpoint
of *this* job: the same rendezvous id (``TORCHELASTIC_RUN_ID``: a fresh one per job with
``--standalone``; pass a unique ``--rdzv-id`` per job otherwise) and the same settings. If
the first attempt died before its first checkpoint, there is nothing of its own to
resume, and the restart starts the run afresh, as the first attempt did.

``terminate_as_exit()`` turns the SIGTERM that the agent sends the surviving processes
into ``SystemExit``, so that a new run that had not reached its first checkpoint removes
its hidden staging folder. A SIGKILL leaves it behind (``.<name>.partial-<job>-*``, the job
tag of ``job_tag``): the next attempt of the same job removes it before it starts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Mapping, Optional

from . import checkpoint

RESTART_ENV, RUN_ID_ENV = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID"
# options that do not make another run: how the run was started, shown or read
LAUNCH_KEYS = ("resume", "overwrite", "progress", "workers", "device")


def restart_count() -> int:
    """How many times torchrun's agent has restarted this job (0: first attempt, or no torchrun)."""
    return int(os.environ.get(RESTART_ENV, "0") or 0)


def identity() -> Optional[dict]:
    """What ``run.json`` records of the torchrun job (None outside torchrun)."""
    if RUN_ID_ENV not in os.environ:
        return None
    return {"run_id": os.environ[RUN_ID_ENV], "restart": restart_count()}


def resumes_own_run(out: Path, config: Mapping, run_file: str = "run.json") -> bool:
    """True when this process is a restart (``TORCHELASTIC_RESTART_COUNT`` > 0) and ``out``
    holds a checkpoint written by this torchrun job (same run id) with the same settings
    ``config`` (but LAUNCH_KEYS): the run to resume. False otherwise, also for a damaged
    or foreign folder (the normal checks then decide, as in the first attempt)."""
    if restart_count() == 0 or RUN_ID_ENV not in os.environ:
        return False
    try:
        saved = json.loads((Path(out) / run_file).read_text(encoding="utf-8"))
        if checkpoint.current(out) is None:
            return False
    except (OSError, ValueError, checkpoint.CheckpointError):
        return False
    job = saved.get("elastic") or {}
    if job.get("run_id") != os.environ[RUN_ID_ENV]:
        return False
    mine = json.loads(json.dumps({k: v for k, v in config.items() if k not in LAUNCH_KEYS}))
    theirs = {k: v for k, v in saved.get("config", {}).items() if k not in LAUNCH_KEYS}
    return mine == theirs


def job_tag() -> Optional[str]:
    """A short tag of this torchrun job (a hash of its rendezvous id; None outside torchrun),
    put into the name of the staging folder a new run is built in: a restart that finds no
    checkpoint of its own removes what its earlier attempts left there (a SIGKILL, or a
    SIGTERM the agent had to follow with SIGKILL, skips their cleanup)."""
    if RUN_ID_ENV not in os.environ:
        return None
    return hashlib.sha1(os.environ[RUN_ID_ENV].encode()).hexdigest()[:12]


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def terminate_as_exit() -> None:
    """SIGTERM raises SystemExit(143) in the main thread (cleanup handlers run)."""
    signal.signal(signal.SIGTERM, _raise_exit)
