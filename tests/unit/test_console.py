"""`rntp.console.routed`: third-party logs and warnings go to the log file in full; the console keeps
RNTP's own lines and anyone's errors; leaving restores logging."""

import logging
import warnings

import pytest

from rntp.console import routed

pytestmark = pytest.mark.unit


def emit():
    logging.getLogger("vllm.engine").info("engine banner")
    logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    warnings.warn("torch.distributed.reduce_op is deprecated", FutureWarning, stacklevel=1)
    logging.getLogger("rntp.train").info("held-out at step 20: info gain -1.0")
    logging.getLogger("deepspeed").error("a third-party error")


def test_the_console_keeps_our_lines_and_errors_and_the_file_keeps_everything(tmp_path, capsys):
    log = tmp_path / "logs" / "rntp.log"
    before = list(logging.getLogger().handlers)
    with routed(log):
        emit()
    console = capsys.readouterr().err
    assert "held-out at step 20" in console and "a third-party error" in console
    assert "engine banner" not in console and "a transformers warning" not in console
    assert "reduce_op" not in console
    written = log.read_text()
    for line in ("engine banner", "a transformers warning", "reduce_op is deprecated", "held-out at step 20",
                 "a third-party error"):
        assert line in written
    assert logging.getLogger().handlers == before  # restored


def test_verbose_leaves_everything_on_the_console(tmp_path, capsys):
    with routed(tmp_path / "rntp.log", verbose=True):
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
    assert not (tmp_path / "rntp.log").exists()
