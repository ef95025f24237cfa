"""What a person reads while `rntp train`, `rntp eval` or `rntp lm-eval` runs: the progress bar, one line per
held-out evaluation, the closing table, RNTP's own warnings and errors. Everything else the process and the
processes it starts write (vLLM's and torch's warnings and banners, W&B's messages, C++ logs, loading bars)
goes, in full, to the run's log file. `--verbose` leaves it all on the terminal (no `captured`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

OWN_LOGGERS = ("rntp", "rollout", "rewards")  # their warnings and errors reach the terminal too

# The terminal's two streams (standard output and error as the command started with them) while captured:
# the progress bars and `say` write to the first (`say` above the bar), RNTP's warnings to the second.
# None when not captured: bars then take tqdm's default, sys.stderr.
terminal: TextIO | None = None
terminal_err: TextIO | None = None


@contextlib.contextmanager
def captured(path: Path, *, fresh: bool) -> Iterator[None]:
    """Point file descriptors 1 and 2 (inherited by every child process: vLLM's engine, torch's C++ logs) at
    `path`, appending, or emptied first when `fresh`, until the block ends; the terminal stays reachable.
    Nothing changes when they already write to that file (a sweep's run, whose output the sweep sends there)
    or when `path` cannot be a file (a run_dir that is a file: the run's own check names that)."""
    global terminal, terminal_err
    path = Path(path)
    if terminal is not None or (path.exists() and any(_same_file(path, fd) for fd in (1, 2))) \
            or any(p.exists() and not p.is_dir() for p in path.parents):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if fresh else 0), 0o644)
    log_file = os.fdopen(os.dup(fd), "a")
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.StreamHandler(terminal_err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in OWN_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    logging.captureWarnings(True)  # Python warnings through logging: into the file, time-stamped
    try:
        yield
    except Exception as e:
        traceback.print_exc(file=log_file)  # the file keeps every failure in full; the caller tells the person
        e.add_note(f"(the full output: {path})")
        raise
    finally:
        logging.captureWarnings(False)
        for name in OWN_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(terminal.fileno(), 1)
        os.dup2(terminal_err.fileno(), 2)
        for stream in (log_file, terminal, terminal_err):
            stream.close()
        terminal = terminal_err = None


def say(text: str) -> None:
    """Something for the person: on the terminal, and in the log file."""
    from tqdm import tqdm

    if terminal is not None:
        print(text, flush=True)  # stdout: the log file
    tqdm.write(text, file=terminal or sys.stdout)  # the bar is cleared, the line printed, the bar redrawn
    (terminal or sys.stdout).flush()


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except OSError:
        return False
