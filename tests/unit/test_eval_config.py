"""`rntp eval --model <run>` reads the run's own config unless --config is given (run_eval patched out)."""

import pytest
import yaml

from rntp.cli import main
from rntp.config import dump_config, load_config

pytestmark = pytest.mark.unit


@pytest.fixture
def seen(monkeypatch):
    calls = []

    def fake_run_eval(models, cfg, out, sampler):
        calls.append(cfg)
        return {"results": [], "positions": 0}

    monkeypatch.setattr("rntp.experiments.evaluate.run_eval", fake_run_eval)
    return calls


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    dump_config(load_config(None, ["data.horizon=5", "eval.num_positions=7", "rollout.max_thought_tokens=9",
                                   f"run_dir={run}"]), run / "config.yaml")
    return run


def test_a_run_folder_is_evaluated_with_its_own_config(run_dir, seen, capsys):
    assert main(["eval", "--model", str(run_dir), "eval.thoughts=2"]) == 0
    cfg = seen[-1]
    assert (cfg.data.horizon, cfg.eval.num_positions, cfg.rollout.max_thought_tokens) == (5, 7, 9)
    assert cfg.eval.thoughts == 2  # overrides still apply on top
    assert f"config: {run_dir / 'config.yaml'}" in capsys.readouterr().out


def test_a_checkpoint_finds_its_own_config_then_its_runs(run_dir, seen):
    ckpt = run_dir / "checkpoints" / "step_000002"
    assert main(["eval", "--model", str(ckpt)]) == 0
    assert seen[-1].data.horizon == 5  # the run folder's config.yaml
    dump_config(load_config(None, ["data.horizon=3"]), ckpt / "rntp_config.yaml")
    assert main(["eval", "--model", str(ckpt)]) == 0
    assert seen[-1].data.horizon == 3  # the checkpoint's own, as it was saved


def test_an_explicit_config_wins_and_a_plain_model_gets_defaults(run_dir, tmp_path, seen, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"data": {"horizon": 11}}))
    assert main(["eval", "--model", str(run_dir), "--config", str(other)]) == 0
    assert seen[-1].data.horizon == 11
    plain = tmp_path / "hf-model"
    plain.mkdir()
    assert main(["eval", "--model", str(plain)]) == 0
    assert seen[-1].data.horizon == load_config().data.horizon
    assert "config: defaults" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").rglob("*.yaml")
                                        if "sweeps" not in p.parts and "lm-eval" not in p.parts))  # RNTP configs
def test_every_shipped_config_evaluates_on_text_it_does_not_train_on(path):
    """Held-out positions come from a separate source, the default corpus's own held-out file, or the
    data.heldout_fraction carve-out of a one-split corpus (never from the training split itself)."""
    cfg = load_config(path)
    e, d = cfg.eval, cfg.data
    separate = e.data is not None and e.data != d.source
    own_split = d.source == "stdlib-docs" and e.split in ("heldout", "test", "validation")
    carved = d.heldout_fraction > 0 and e.split != d.split
    assert separate or own_split or carved, f"{path}: eval reads data.split={d.split!r} of {d.source}"
