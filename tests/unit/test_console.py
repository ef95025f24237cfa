"""rntp.console: the terminal shows what a person reads; the log file keeps everything, child processes' and
C-level output included; nothing is printed twice when the output already goes to that file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rntp import console

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NOISE = ["python stdout noise", "C-level stderr noise", "child stdout noise", "child stderr noise",
         "a FutureWarning noise", "engine banner noise"]
SCRIPT = """
import logging, os, subprocess, sys, warnings
from rntp import console
logging.basicConfig(level=logging.INFO)
with console.captured(sys.argv[1], fresh=sys.argv[2] == "fresh"):
    print("python stdout noise")
    os.write(2, b"C-level stderr noise\\n")
    subprocess.run([sys.executable, "-c", "import sys; print('child stdout noise'); print('child stderr noise', "
                    "file=sys.stderr)"])
    warnings.warn("a FutureWarning noise", FutureWarning)
    logging.getLogger("vllm.engine").info("engine banner noise")
    logging.getLogger("rntp.train").warning("own warning")
    console.say("held-out line")
print("after the block")
if sys.argv[3] == "crash":
    with console.captured(sys.argv[1], fresh=False):
        raise RuntimeError("boom")
"""


def run(log: Path, *args: str, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(log), *args], env=env, text=True, timeout=60,
                          **(popen or {"capture_output": True}))


def test_the_terminal_gets_the_persons_lines_and_the_file_everything(tmp_path):
    log = tmp_path / "run" / "train.log"
    log.parent.mkdir()
    log.write_text("an earlier run's output\n")
    done = run(log, "fresh", "crash")
    assert done.returncode == 1
    assert done.stdout == "held-out line\nafter the block\n"
    assert "WARNING rntp.train: own warning" in done.stderr
    assert "RuntimeError: boom" in done.stderr and f"(the full output: {log})" in done.stderr
    assert not [n for n in NOISE if n in done.stdout + done.stderr]
    text = log.read_text()
    assert "an earlier run's output" not in text  # fresh: emptied first
    assert all(n in text for n in NOISE), text
    assert "own warning" in text and text.count("held-out line") == 1
    assert "RuntimeError: boom" in text and "Traceback" in text  # the second block appended its failure
    assert "after the block" not in text


def test_output_already_going_to_the_file_is_left_alone(tmp_path):
    """A sweep starts each run with its output in train.log: captured() then changes nothing, and says once."""
    log = tmp_path / "train.log"
    with open(log, "a") as f:
        f.write("the sweep's header\n")
        f.flush()
        done = run(log, "fresh", "no-crash", stdout=f, stderr=subprocess.STDOUT)
    assert done.returncode == 0
    text = log.read_text()
    assert text.startswith("the sweep's header\n")  # not emptied
    assert all(n in text for n in NOISE) and text.count("held-out line") == 1


def test_the_descriptors_come_back_in_the_same_process(tmp_path, capfd):
    """`rntp.cli.main` runs in-process in tests: after the block, fds 1 and 2 are the caller's again."""
    log = tmp_path / "eval.log"
    with console.captured(log, fresh=True):
        os.write(1, b"inside\n")
        os.write(2, b"inside too\n")
    os.write(1, b"outside\n")
    out, err = capfd.readouterr()
    assert out == "outside\n" and err == ""
    assert log.read_text() == "inside\ninside too\n"
    assert console.terminal is None and console.terminal_err is None


def test_a_run_dir_that_is_a_file_is_not_captured(tmp_path, capfd):
    (tmp_path / "run").write_text("not a folder")
    with console.captured(tmp_path / "run" / "train.log", fresh=True):
        os.write(1, b"still here\n")
    assert capfd.readouterr().out == "still here\n"


def test_a_line_said_during_the_progress_bar_stands_on_its_own_line(tmp_path):
    script = ("import sys\nfrom tqdm import tqdm\nfrom rntp import console\n"
              "with console.captured(sys.argv[1], fresh=True):\n"
              "    bar = tqdm(range(3), file=console.terminal, desc='train')\n"
              "    for i in bar:\n"
              "        if i == 1:\n"
              "            console.say('held-out, step 1')\n"
              "    bar.close()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "train.log")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = [line.split("\r")[-1].strip() for line in done.stdout.split("\n")]
    assert "held-out, step 1" in lines, repr(done.stdout)  # not glued to the bar's line
    assert "train: 100%" in done.stdout and "train:" not in (tmp_path / "train.log").read_text()
