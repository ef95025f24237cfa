import pytest

from rntp.config import Config, ConfigError, load_config

pytestmark = pytest.mark.unit


def test_defaults_validate():
    assert load_config().rollout.group_size == Config().rollout.group_size


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nrollout:\n  group_size: 8\n")
    cfg = load_config(f, ["train.steps=3", "grpo.loss_aggregation=token_mean", "optim.betas=[0.9, 0.95]"])
    assert (cfg.train.steps, cfg.rollout.group_size, cfg.grpo.loss_aggregation) == (3, 8, "token_mean")
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "train.stepz: Extra inputs are not permitted"),
    ("nonsense=1", "nonsense: Extra inputs are not permitted"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("grpo.loss_aggregation=mean", "grpo.loss_aggregation"),
    ("train.steps=many", "train.steps"),
    ("rollout.sampler=server", "rollout.server.urls"),
    ("rollout.vllm.sleep_level=3", "rollout.vllm.sleep_level"),
    ("rollout.server.weight_transfer=tcp", "rollout.server.weight_transfer"),
])
def test_bad_keys_and_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_positions_must_fit_the_chunk():
    with pytest.raises(ConfigError, match="cannot fit"):
        load_config(None, ["data.chunk_tokens=40", "data.min_context=30", "data.horizon=8",
                           "data.positions_per_chunk=5"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").rglob("*.yaml")
                                        if "sweeps" not in p.parts and "lm-eval" not in p.parts))  # not RNTP configs
def test_every_shipped_config_validates(path):
    load_config(path)


def test_every_shipped_sweep_validates():
    from pathlib import Path

    from rntp.experiments.sweep import plan, load_sweep

    for path in Path("configs/sweeps").glob("*.yaml"):
        assert plan(load_sweep(path))  # every run's config and reward names resolve


def test_serve_dry_run_prints_the_vllm_server_command(capsys):
    from rntp.cli import main

    assert main(["serve", "--dry-run", "--port", "8123", "rollout.server.weight_transfer=gloo", "data.chunk_tokens=64",
                 "rollout.max_thought_tokens=6", "--", "--tensor-parallel-size", "2"]) == 0
    command = capsys.readouterr().out.strip()
    assert command.startswith("VLLM_SERVER_DEV_MODE=1 ")
    assert "-m vllm.entrypoints.launchers.api_server.entry " in command
    assert """--weight-transfer-config '{"backend": "gloo"}'""" in command
    assert "--generation-config vllm" in command  # not the model's sampling defaults
    assert command.endswith("--tensor-parallel-size 2")  # arguments after -- go to vLLM unchanged
    # context 64 + thought 6 + the tags' tokens + slack, so no sequence the sampler sees is cut
    assert int(command.split("--max-model-len ")[1].split()[0]) >= 64 + 6 + 2


def test_configuration_page_table_is_generated_from_the_models():
    """Every key of every section has a docstring, and the table in docs/configuration.md is
    `config_table()` (run `python -m rntp.config` after changing a field)."""
    from pathlib import Path

    from pydantic import BaseModel

    from rntp.config import CONFIG_DOC, TABLE_END, TABLE_START, config_table, render_config_table

    def leaves(cls, prefix=""):
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from leaves(field.annotation, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    undocumented = [key for key, field in leaves(Config) if not (field.description or "").strip()]
    assert not undocumented, f"config fields without a docstring: {undocumented}"
    table = config_table()
    assert all(f"| `{key}` |" in table for key, _ in leaves(Config))
    assert CONFIG_DOC == Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    page = CONFIG_DOC.read_text()
    assert page.count(TABLE_START) == page.count(TABLE_END) == 1, "docs/configuration.md lost its table markers"
    stale = "docs/configuration.md's configuration table is stale: run python -m rntp.config"
    assert render_config_table(page) == page, stale

@pytest.mark.parametrize("override, message", [
    ("optim.betas=[0.9, 1.5]", "optim.betas.1"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas.0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas.1"),
    ("optim.eps=0", "optim.eps"),
    ("optim.eps=-1e-8", "optim.eps"),
    ("train.seed=-1", "train.seed"),
    ("data.seed=-3", "data.seed"),
    ("eval.seed=-1", "eval.seed"),
    ("rollout.vllm.max_model_len=0", "rollout.vllm.max_model_len"),
    ("train.steps=true", "train.steps"),  # lax pydantic read true as 1: a one-step run
    ("train.micro_batch=false", "train.micro_batch"),
    ("rollout.vllm.sleep_level=true", "rollout.vllm.sleep_level"),
    ("optim.lr=true", "optim.lr"),
    ("log.progress=1", "log.progress"),
    ("data.streaming=yes please", "data.streaming"),
    ("overwrite=1", "overwrite"),
])
def test_values_that_would_fail_later_or_mean_nothing_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_bounded_values_still_accept_the_usual_ones():
    cfg = load_config(None, ["optim.betas=[0.0, 0.999]", "optim.eps=1e-6", "train.seed=0", "log.progress=false",
                             "train.steps=3", "optim.lr=1e-5"])
    assert cfg.optim.betas == (0.0, 0.999) and cfg.optim.lr == 1e-5 and cfg.train.steps == 3


@pytest.mark.parametrize("text", ["train:\n  steps: [1, 2\n", "train:\n\tsteps: 3\n", "a: b: c\n"])
def test_yaml_syntax_errors_in_a_config_file_are_one_line_naming_the_file(tmp_path, text):
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: YAML syntax error") and "\n" not in str(e.value)


def test_yaml_syntax_error_in_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"^override 'reward\.weights=\{a: 1': YAML syntax error"):
        load_config(None, ["reward.weights={a: 1"])


def test_yaml_syntax_error_in_a_sweep_file_is_a_config_error(tmp_path):
    from rntp.experiments.sweep import load_sweep

    f = tmp_path / "sweep.yaml"
    f.write_text("name: x\ngrid: {reward.name: [a, b}\n")
    with pytest.raises(ConfigError, match="sweep.yaml: YAML syntax error"):
        load_sweep(f)


@pytest.mark.parametrize("argv", [["train", "--config", "BROKEN"], ["train", "reward.weights={a: 1"],
                                  ["sweep", "BROKEN"]])
def test_cli_prints_one_line_for_yaml_errors(tmp_path, capsys, argv):
    from rntp.cli import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1,\n")
    assert main([str(broken) if a == "BROKEN" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert "YAML syntax error" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
