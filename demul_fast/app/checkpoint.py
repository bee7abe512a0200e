"""A training run's folder on disk: checkpoints replaced as one unit, new runs built beside the old.

A checkpoint is one folder, ``checkpoint-<epoch>/`` or, taken within an epoch,
``checkpoint-<epoch>-step<step>/`` (the prompts, the trainer state, the
log), written completely and flushed to disk, then made current by replacing one small
pointer file, ``checkpoint.json``, with ``os.replace``; the previous checkpoint folder is
removed only after that. A crash at any moment leaves the pointer on a complete checkpoint
(a half-written folder beside it is ignored, and removed by the next write).

A new run is built in a hidden sibling folder (``.<name>.partial-*``, next to ``<name>``)
and moved to ``<name>`` only once its first checkpoint exists. An existing run it replaces
(``--overwrite``) stays untouched until then; it is renamed aside, the new run renamed in,
and the old one deleted. A failed start deletes its own partial folder and nothing else.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

POINTER_FILE = "checkpoint.json"
PREFIX = "checkpoint-"


class CheckpointError(ValueError):
    """A checkpoint does not fit: other class names, other shapes, other settings, missing files."""


def _fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (POSIX; a no-op where directories
    cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a flushed temporary file, then one replace."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def current(run: Path) -> Optional[Path]:
    """The folder of ``run``'s current checkpoint, or None when it has none yet."""
    pointer = Path(run) / POINTER_FILE
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["folder"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is damaged ({type(exc).__name__}: {exc})") from exc
    folder = Path(run) / name
    if not (name.startswith(PREFIX) and folder.is_dir()):
        raise CheckpointError(f"{pointer} names the checkpoint {name!r}, which {run} does not hold")
    return folder


def name(epoch: int, step: Optional[int] = None) -> str:
    """The folder of the checkpoint after ``epoch`` (1-based), or after ``step`` steps of it."""
    return f"{PREFIX}{epoch:04d}" + ("" if step is None else f"-step{step:04d}")


def write(run: Path, epoch: int, write_files: Callable[[Path], None], step: Optional[int] = None) -> Path:
    """Write checkpoint ``epoch`` (1-based) of ``run`` as one unit and make it current; with
    ``step``, the checkpoint taken after ``step`` steps of that epoch.

    write_files(folder) writes the checkpoint's files into the empty ``folder``. Returns
    the new checkpoint folder. Only this function writes checkpoints (under torchrun it is
    the one call that rank 0 alone makes).
    """
    run = Path(run)
    previous = current(run)
    folder = run / name(epoch, step)
    if previous is not None and previous.name == folder.name:
        raise CheckpointError(f"checkpoint {folder} is current and cannot be rewritten in place")
    if folder.exists():
        shutil.rmtree(folder)  # left half-written by an interrupted write
    folder.mkdir()
    write_files(folder)
    _fsync_tree(folder)
    _fsync_dir(run)
    write_json(run / POINTER_FILE, {"folder": folder.name, "epoch": epoch, "step": step})
    for stale in run.glob(PREFIX + "*"):
        if stale.is_dir() and stale.name != folder.name:
            shutil.rmtree(stale)
    return folder


def staging_folder(out: Path, job: Optional[str] = None) -> Path:
    """A new empty hidden folder beside ``out`` to build a new run in (parents of ``out`` are
    created). A symbolic link ``out`` stands for the folder it points to. ``job`` (a torchrun
    job's tag, app/elastic.py ``job_tag``) goes into the name, so that a restart of the same
    job can find what an earlier attempt left (``remove_staging``)."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-" + (f"{job}-" if job else ""), dir=out.parent))


def remove_staging(out: Path, job: str) -> List[Path]:
    """Delete the staging folders of ``out`` made for ``job`` (``staging_folder(out, job)``):
    those of an earlier attempt of the same torchrun job, killed before its first checkpoint.
    No other folder is touched (another job's staging carries another tag). Returns them."""
    out = Path(out).resolve()
    gone = [p for p in out.parent.glob(f".{glob.escape(out.name)}.partial-{glob.escape(job)}-*") if p.is_dir()]
    for p in gone:
        shutil.rmtree(p)
    return gone


def swap_in(staging: Path, out: Path) -> None:
    """Move the run built in ``staging`` to ``out``; a run already in ``out`` is deleted only
    after the new one is in place.

    Two renames: between them (a process killed in that instant) the old run survives as
    ``.<name>.replaced-*`` beside ``out``.
    """
    staging, out = Path(staging), Path(out).resolve()
    if current(staging) is None:
        raise CheckpointError(f"{staging} has no checkpoint yet; it cannot replace {out}")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = staging.with_name(staging.name.replace(".partial-", ".replaced-", 1))
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)
