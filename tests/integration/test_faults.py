"""Faults and bad input, as a careful user would try them: crashes and resumes, existing run
folders, damaged checkpoints, torn logs, broken models and data, signals during start-up."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import rntp.train
from rntp.checkpoint import find_checkpoint, load_trainer_state
from rntp.cli import main
from rntp.config import load_config
from rntp.train import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def rows(path):
    return [json.loads(line) for line in open(path)]


def overrides(tiny_model_dir, corpus_file, run_dir, *extra):
    return [f"run_dir={run_dir}", f"model.name_or_path={tiny_model_dir}", f"data.source={corpus_file}",
            "data.chunk_tokens=64", "data.min_context=16", "data.horizon=4", "rollout.sampler=hf",
            "rollout.group_size=4", "rollout.max_thought_tokens=6", "train.positions_per_step=2",
            "train.micro_batch=8", "train.steps=2", "log.wandb_mode=disabled", "log.progress=false",
            "log.plot=false", "rollout.tag_tokens=text", *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a model is loaded (by the trainer, or to make a tagged copy): bad input must be
    reported before that."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(rntp.train, "load_policy", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # (an invalid config lists each bad key on an indented line of its own)
    lines = [line for line in err.strip().splitlines() if " INFO " not in line and " WARNING " not in line
             and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("rntp train: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return lines[0]


# ---- 1 and 4: a crash after logging, before the checkpoint; a torn last line -------------------------

def test_resume_after_a_crash_logs_every_step_once_and_tolerates_a_torn_last_line(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("train.steps=3", "train.save_every=2"))
    # What a SIGKILL while writing step 3's checkpoint leaves: steps 1-3 logged, step 3's checkpoint
    # only as a staging folder, `latest` still at step 2, and half a line of the next metrics row.
    (run / "checkpoints" / "step_000003").rename(run / "checkpoints" / ".step_000003.tmp")
    (run / "checkpoints" / "latest").write_text("step_000002\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/mean": -3.1')
    before = rows(run / "samples.jsonl")
    assert [r["step"] for r in before] == [1, 1, 2, 2, 3, 3]
    train(tiny_config("train.steps=3", f"resume={run}"))
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]
    after = rows(run / "samples.jsonl")
    assert [r["step"] for r in after] == [1, 1, 2, 2, 3, 3]  # step 3 once, not twice
    assert after[:4] == before[:4]
    assert find_checkpoint(run).name == "step_000003"


def test_compare_tolerates_a_torn_last_line_and_names_a_bad_line(tmp_path, capsys):
    run = tmp_path / "a"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n{"step": 2, "reward/mean": 0.7}\n'
                                       '{"step": 3, "rew')
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "| a | 2 |" in (tmp_path / "cmp" / "compare.md").read_text()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\nnot json\n{"step": 3, "reward/mean": 0.7}\n')
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: line 2 is not valid JSON" in err and "Traceback" not in err


def run_until(cmd, env, stop_when, timeout=300):
    """Start a training process and SIGKILL it as soon as `stop_when()` holds (what a node failure,
    the OOM killer or SLURM's final kill does: no handler runs)."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not stop_when():
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the fault: " + proc.stderr.read()[-2000:]
    proc.kill()
    proc.wait()
    return proc.returncode


def test_sigkill_after_logging_and_mid_checkpoint_then_resume_reproduces_the_run(
        tiny_model_dir, corpus_file, tmp_path):
    common = ["train.steps=6", "train.save_every=2", "optim.lr=1e-3"]
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # the uninterrupted run in a process like the killed one's (one thread: the same float sums)
    subprocess.run([sys.executable, "-m", "rntp", "train", *overrides(tiny_model_dir, corpus_file, tmp_path / "full",
                                                                       *common)], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    cmd = [sys.executable, "-m", "rntp", "train", *overrides(tiny_model_dir, corpus_file, run, *common)]
    # a step is fully logged once its samples are flushed (they follow its metrics row)
    logged = lambda step: (run / "samples.jsonl").exists() and \
        (run / "samples.jsonl").read_text().count(f'{{"step": {step},') == 2  # noqa: E731
    # fault 1: step 3 logged (metrics and samples), its checkpoint not due until step 4
    assert run_until(cmd, env, lambda: logged(3)) == -signal.SIGKILL
    # fault 2: in the middle of writing step 4's checkpoint (or, if that was too quick to catch, after step 5)
    staging = run / "checkpoints" / ".step_000004.tmp"
    fault = lambda: (logged(4) and staging.exists()) or logged(5)  # noqa: E731
    assert run_until(cmd + [f"resume={run}"], env, fault) == -signal.SIGKILL
    print("fault 2 hit", "a checkpoint being written" if staging.exists() else "the run after step 5")
    subprocess.run(cmd + [f"resume={run}"], env=env, cwd=ROOT, check=True, capture_output=True)
    full, resumed = rows(tmp_path / "full" / "metrics.jsonl"), rows(run / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        for key in ("reward/mean", "score/no_think", "optim/grad_norm", "optim/lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert rows(run / "samples.jsonl") == rows(tmp_path / "full" / "samples.jsonl")  # each step once, same thoughts
    a = load_trainer_state(find_checkpoint(tmp_path / "full"))
    b = load_trainer_state(find_checkpoint(run))
    assert a["step"] == b["step"] == 6 and a["ranks"][0]["data"] == b["ranks"][0]["data"]
    from safetensors.torch import load_file

    wa = load_file(find_checkpoint(tmp_path / "full") / "model.safetensors")
    wb = load_file(find_checkpoint(run) / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


# ---- 2: a folder that already holds a run ---------------------------------------------------------------

def test_a_folder_holding_a_run_is_refused_kept_intact_and_overwritten_only_when_asked(
        tiny_model_dir, corpus_file, tmp_path, capsys):
    run = tmp_path / "run"
    base = overrides(tiny_model_dir, corpus_file, run, "train.steps=2", "train.save_every=1")
    assert main(["train", *base]) == 0
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # a second start (even one that would fail at once on bad data) changes nothing
    (tmp_path / "short.jsonl").write_text('{"text": "too short"}\n')
    capsys.readouterr()
    for extra in ([], ["train.seed=5"], [f"data.source={tmp_path / 'short.jsonl'}"],
                  [f"resume={run / 'checkpoints' / 'step_000001'}", f"run_dir={tmp_path / 'other'}"]):
        target = tmp_path / "other" if extra and extra[-1].startswith("run_dir") else run
        if target != run:  # the other folder holds a run too: resuming someone else's checkpoint into it
            shutil.copytree(run, target)
        assert main(["train", *base, *extra]) == 2
        one_line_error(capsys, f"run_dir {target} already holds a run", f"resume={target}", "overwrite=true")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot
    # resuming it is fine; overwriting it, when asked, leaves only the new run
    assert main(["train", *base, "train.steps=3", f"resume={run}"]) == 0
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert main(["train", *base, "train.steps=1", "train.seed=7", "overwrite=true"]) == 0
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    assert "seed: 7" in (run / "config.yaml").read_text()


# ---- 3: damaged checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tiny_model_dir, corpus_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpts") / "run"
    train(load_config(None, overrides(tiny_model_dir, corpus_file, run, "train.steps=2", "train.save_every=1")))
    return run


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip(path, at=0.6):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))


DAMAGE = {
    "model truncated": lambda c: truncate(c / "model.safetensors"),
    "model zero length": lambda c: (c / "model.safetensors").write_bytes(b""),
    "model bytes flipped": lambda c: flip(c / "model.safetensors"),
    "trainer_state zero length": lambda c: (c / "trainer_state.pt").write_bytes(b""),
    "trainer_state truncated": lambda c: truncate(c / "trainer_state.pt", 0.9),
    "trainer_state bytes flipped": lambda c: flip(c / "trainer_state.pt", 0.3),
    "tokenizer truncated": lambda c: truncate(c / "tokenizer.json"),
    "tokenizer missing": lambda c: (c / "tokenizer.json").unlink(),
    "config missing": lambda c: (c / "config.json").unlink(),
    "manifest garbled": lambda c: (c / "manifest.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_detected_and_the_newest_intact_one_used(two_checkpoints, tmp_path, damage, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    DAMAGE[damage](run / "checkpoints" / "step_000002")
    with caplog.at_level(logging.WARNING, logger="rntp.checkpoint"):
        found = find_checkpoint(run)
    assert found.name == "step_000001"
    assert "skipped damaged checkpoint(s) step_000002 (" in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint .*step_000002 is damaged: .*resume from its run folder"):
        find_checkpoint(run / "checkpoints" / "step_000002")  # named directly: an error, not a silent swap
    DAMAGE[damage](run / "checkpoints" / "step_000001")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint in .*step_000002 .*step_000001"):
        find_checkpoint(run)


def test_eval_of_a_run_folder_leaves_out_a_damaged_checkpoint(two_checkpoints, tmp_path, caplog):
    from rntp.experiments.evaluate import discover

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    truncate(run / "checkpoints" / "step_000001" / "trainer_state.pt")
    with caplog.at_level(logging.WARNING, logger="rntp.experiments.evaluate"):
        labels = [m["label"] for m in discover([str(run)])]
    assert labels[1:] == ["step_000002"] and "skipping damaged checkpoint" in caplog.text


def test_an_older_checkpoint_without_manifest_gets_structural_checks(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for c in (run / "checkpoints").glob("step_*"):
        (c / "manifest.json").unlink(missing_ok=True)
    assert find_checkpoint(run).name == "step_000002"  # still usable
    truncate(run / "checkpoints" / "step_000002" / "model.safetensors")
    assert find_checkpoint(run).name == "step_000001"
    (run / "checkpoints" / "step_000001" / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="trainer_state.pt missing or empty"):
        find_checkpoint(run)


def test_resume_falls_back_past_a_damaged_checkpoint_and_finishes(two_checkpoints, tmp_path, tiny_config, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    flip(run / "checkpoints" / "step_000002" / "model.safetensors")  # silent before: it crashed in sampling later
    with caplog.at_level(logging.WARNING):
        final = train(tiny_config("train.steps=3", f"resume={run}"))
    assert "skipped damaged checkpoint(s) step_000002" in caplog.text
    assert final.name == "step_000003" and load_trainer_state(final)["step"] == 3
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2, 3]  # step 2 trained again, logged once
    assert find_checkpoint(run) == final  # the newest intact one; the damaged step 2 is left as it was found


# ---- 5, 6, 7: bad input is one readable line, before any model loads -----------------------------------

def test_bad_paths_models_and_values_are_one_line_before_any_model_loads(
        tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    args = lambda *extra: ["train", *overrides(tiny_model_dir, corpus_file, tmp_path / "r", *extra)]  # noqa: E731
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    truncate(broken / "model.safetensors")
    bad_tok = tmp_path / "bad-tokenizer"
    shutil.copytree(tiny_model_dir, bad_tok)
    truncate(bad_tok / "tokenizer.json")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    cases = [
        (["model.name_or_path=models/not-here"], ["'models/not-here' is neither a local path nor reachable"]),
        (["model.name_or_path=a/b/c"], ["neither a local path nor a valid hub name"]),
        (["data.source=corpora/not-here.jsonl"], ["'corpora/not-here.jsonl' is neither a local path nor reachable"]),
        ([f"run_dir={tmp_path / 'a-file'}"], ["is a file, not a folder"]),
        ([f"model.name_or_path={broken}"], [f"model folder {broken}: model.safetensors is truncated"]),
        ([f"model.name_or_path={bad_tok}"], [f"cannot load the tokenizer in {bad_tok}"]),
        (["rollout.vllm.max_model_len=40"], ["rollout.vllm.max_model_len=40 is below the"]),
        ([f"data.source={tmp_path / 'short.jsonl'}"], ["yields no usable positions"]),
        (["train.steps=true"], ["train.steps"]),
        (["optim.betas=[0.9, 1.2]"], ["optim.betas"]),
        (["train.attention=flex"], ["train.attention=flex needs CUDA"]),
    ]
    for extra, needles in cases:
        assert main(args(*extra)) == 2, extra
        one_line_error(capsys, *needles)
        # nothing written but the failed start's log, which keeps the error with its traceback (a config that
        # does not validate, or a run_dir that is a file, fails before there is a log)
        assert {p.name for p in (tmp_path / "r").iterdir()} <= {"train.log"}, extra
        before_the_log = extra[0].startswith(("run_dir=", "train.steps=", "optim.betas="))
        assert before_the_log or needles[-1] in (tmp_path / "r" / "train.log").read_text(), extra


def test_bad_data_with_tags_to_add_is_one_line_before_any_model_loads_or_copy_is_made(
        tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch, no_model_load):
    """Under the default `rollout.tag_tokens=add` a first run makes a tagged copy of the model, which
    loads its weights; bad data or lengths must be reported before that, and nothing made."""
    monkeypatch.setenv("RNTP_HOME", str(tmp_path / "home"))
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    for extra, needle in [([f"data.source={tmp_path / 'short.jsonl'}"], "yields no usable positions"),
                          (["rollout.vllm.max_model_len=40"], "rollout.vllm.max_model_len=40 is below the")]:
        args = ["train", *overrides(tiny_model_dir, corpus_file, tmp_path / "r", *extra), "rollout.tag_tokens=add"]
        assert main(args) == 2, extra
        one_line_error(capsys, needle)
    assert not (tmp_path / "home" / "tagged").exists()


# ---- 9: SIGTERM during start-up ---------------------------------------------------------------------------

def test_sigterm_during_start_up_exits_cleanly(tiny_model_dir, corpus_file, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rntp", "train", *overrides(tiny_model_dir, corpus_file, run, "train.steps=50")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)  # importing torch and transformers alone takes longer on these machines
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested during start-up" in out and "Traceback" not in out
    assert not (run / "metrics.jsonl").exists()  # nothing half-started: the same command runs later
    assert main(["train", *overrides(tiny_model_dir, corpus_file, run, "train.steps=1")]) == 0


# ---- 10, 11 -----------------------------------------------------------------------------------------------

def test_a_resumed_run_continues_the_same_wandb_run(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    train(tiny_config("train.steps=1", "train.save_every=1", "log.wandb_mode=offline"))
    train(tiny_config("train.steps=2", f"resume={run}", "log.wandb_mode=offline"))
    folders = sorted((run / "wandb").glob("offline-run-*"))  # offline-run-<time>-<run id>
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1, folders


def test_score_throughput_counts_every_token_scored(tiny_config, tmp_path, monkeypatch, tokenizer):
    from rollout import ThinkTags

    seen = []
    original = rntp.train.score_groups

    def spy(model, contexts, rollouts, targets, *args, **kwargs):
        seen.append(sum(len(c) + len(t) for c, t in zip(contexts, targets)) +  # the no-think pass per position
                    sum(len(r.prompt_ids) - len(contexts[r.group]) + len(r.thought_ids) + len(targets[r.group])
                        for r in rollouts))  # each thought: open tag (as in its prompt), thought, close, target
        return original(model, contexts, rollouts, targets, *args, **kwargs)

    monkeypatch.setattr(rntp.train, "score_groups", spy)
    train(tiny_config("train.steps=1"))
    row = rows(tmp_path / "run" / "metrics.jsonl")[0]
    assert len(ThinkTags(tokenizer).open_ids) > 1  # what the old count (open tag = 1 token) got wrong
    assert row["tokens_per_s/score"] * row["time/score"] == pytest.approx(seen[0], rel=1e-9)


def test_a_step_without_an_optimizer_step_leaves_the_schedule_alone(tiny_config, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config("train.steps=3", "grpo.min_group_std=1e6", "optim.schedule=linear", "optim.lr=1e-3"))
    history = rows(tmp_path / "run" / "metrics.jsonl")
    assert all("optim/grad_norm" not in r for r in history)  # every group dropped: no optimizer step
    assert [r["optim/lr"] for r in history] == [1e-3] * 3  # the schedule follows optimizer steps
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def test_transformers_sampler_leaves_the_global_rng_alone(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from rollout import SamplingSpec, ThinkTags
    from rollout.hf_sampler import HFSampler

    sampler = HFSampler(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ThinkTags(tokenizer))
    prompts = [tokenizer.encode("The model reads a file and"), tokenizer.encode("Each token")]
    spec = SamplingSpec(3, 5, 1.0, 1.0, seed=11)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = sampler.sample(prompts, spec)
    assert torch.equal(torch.rand(4), expected)  # the caller's random stream is untouched
    assert [r.thought_ids for r in sampler.sample(prompts, spec)] == [r.thought_ids for r in first]  # seeded
    other = sampler.sample(prompts, SamplingSpec(3, 5, 1.0, 1.0, seed=12))
    assert [r.thought_ids for r in other] != [r.thought_ids for r in first]
