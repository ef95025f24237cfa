"""What a person reads on the console, and where the rest goes.

Libraries RNTP runs on talk a lot: vLLM's engine banners and NUMA notes, torch's and transformers'
warnings, W&B's advertising, weight-loading progress bars. Unless `--verbose` is given, `rntp train`,
`eval` and `sweep` send all of it, in full and with timestamps, to a log file (the run's
`logs/rntp.log`), and keep on the console RNTP's own lines (start-up, one line per held-out
evaluation, where things were written, the final table), the progress bar, and any error or
third-party ERROR.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

OWN = ("rntp", "rollout", "rewards", "__main__")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OwnOrSevere(logging.Filter):
    """RNTP's own records (rank 0's only under torchrun), and anyone's errors."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN and self.rank == 0
        return own or record.levelno >= logging.ERROR


class _Stderr(logging.StreamHandler):
    """The console: whatever sys.stderr is when a record comes (it may be replaced, e.g. by pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


@contextlib.contextmanager
def routed(log_file: Path, *, verbose: bool = False):
    """For one command: unless `verbose`, third-party logs and warnings to `log_file` (one per rank
    under torchrun: rntp.log, rntp.rank1.log, ...), RNTP's own on the console too. Enter it before the
    heavy imports (vLLM reads VLLM_CONFIGURE_LOGGING when it is imported); leaving restores logging."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format=FORMAT)
        yield
        return
    rank = int(os.environ.get("RANK", "0"))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's loggers then propagate to ours
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banners and advertising
    log_file = log_file if rank == 0 else log_file.with_name(f"{log_file.stem}.rank{rank}{log_file.suffix}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    everything = logging.FileHandler(log_file)
    everything.setFormatter(logging.Formatter(FORMAT))
    console = _Stderr()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(_OwnOrSevere(rank))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(everything)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the py.warnings logger -> the file
    import transformers  # its own handler off, its records to ours, no weight-loading bars

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per place, into the file
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(everything)
        root.removeHandler(console)
        everything.close()
        root.setLevel(level)
        transformers.utils.logging.enable_default_handler()
        transformers.utils.logging.disable_propagation()
        transformers.utils.logging.enable_progress_bar()
