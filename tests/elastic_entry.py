"""``demul-fast`` as a torchrun worker, with faults planted and writes audited (tests/test_elastic.py).

    python -m torch.distributed.run ... tests/elastic_entry.py train --out RUN ...

Environment (read in every worker):

DEMUL_TEST_GUARD   a folder; a rank other than 0 that creates, writes, renames or deletes
                   anything below it exits at once with status 86 (only rank 0 writes).
DEMUL_TEST_KILL    ``step:RANK:N``: in the first attempt (TORCHELASTIC_RESTART_COUNT 0), rank
                   RANK kills itself (SIGKILL) just before its N-th optimizer step (1-based,
                   counted over the whole run); ``write:RANK:N``: rank RANK kills itself
                   inside its N-th checkpoint write, after the checkpoint's files are written
                   and before the pointer names them.
DEMUL_TEST_EVENTS  a file; rank 0 appends one JSON line per event: ``start`` (the attempt, the
                   time, the current checkpoint of --out), ``kill`` (the time), ``step`` (the
                   time of the first optimizer step of each attempt).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def event(kind: str, **info) -> None:
    path = os.environ.get("DEMUL_TEST_EVENTS")
    if path and (RANK == 0 or kind == "kill"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(event=kind, rank=RANK, attempt=ATTEMPT, time=time.time(), **info)) + "\n")


def die() -> None:
    event("kill")
    os.kill(os.getpid(), signal.SIGKILL)


def guard(folder: str) -> None:
    """Exit (status 86) on any change below ``folder`` by this process."""
    root = os.path.realpath(folder)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        full = os.path.realpath(os.fsdecode(path))
        return full == root or full.startswith(root + os.sep)

    def hook(name, args):
        if name == "open":
            path, mode, flags = args
            changes = any(c in (mode or "") for c in "wax+") or (mode is None and flags & writing)
            paths = [path] if changes else []
        elif name in ("os.rename", "os.replace"):
            paths = args[:2]
        elif name in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.symlink"):
            paths = args[:1]
        else:
            return
        bad = [p for p in paths if inside(p)]
        if bad:
            sys.stderr.write(f"rank {RANK} changed {bad[0]} ({name})\n")
            sys.stderr.flush()
            os._exit(86)

    sys.addaudithook(hook)


def plant(spec: str) -> None:
    kind, rank, n = spec.split(":")
    if int(rank) != RANK or ATTEMPT != 0:
        return
    n = int(n)
    if kind == "step":
        step = torch.optim.SGD.step
        count = [0]

        def counted(self, *args, **kwargs):
            count[0] += 1
            if count[0] == n:
                die()
            return step(self, *args, **kwargs)

        torch.optim.SGD.step = counted
    elif kind == "write":
        from demul_fast.app import checkpoint

        write = checkpoint.write
        count = [0]

        def torn(run, *args, **kwargs):
            count[0] += 1
            if count[0] != n:
                return write(run, *args, **kwargs)
            *rest, files = args

            def then_die(folder):
                files(folder)
                die()

            return write(run, *rest, then_die, **kwargs)

        checkpoint.write = torn
    else:
        raise ValueError(f"DEMUL_TEST_KILL={spec!r}")


def first_step_event() -> None:
    step = torch.optim.SGD.step
    seen = [False]

    def timed(self, *args, **kwargs):
        if not seen[0]:
            seen[0] = True
            event("step")
        return step(self, *args, **kwargs)

    torch.optim.SGD.step = timed


def main() -> int:
    argv = sys.argv[1:]
    out = Path(argv[argv.index("--out") + 1])
    from demul_fast.app import checkpoint, cli

    try:
        current = checkpoint.current(out)
    except checkpoint.CheckpointError as exc:
        current = f"damaged: {exc}"
    event("start", checkpoint=None if current is None else str(getattr(current, "name", current)),
          folders=sorted(p.name for p in out.glob(checkpoint.PREFIX + "*")) if out.is_dir() else [])
    first_step_event()
    if os.environ.get("DEMUL_TEST_KILL"):
        plant(os.environ["DEMUL_TEST_KILL"])
    if RANK != 0 and os.environ.get("DEMUL_TEST_GUARD"):
        guard(os.environ["DEMUL_TEST_GUARD"])
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
