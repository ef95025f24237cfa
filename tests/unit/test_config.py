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
                                        if "sweeps" not in p.parts))
def test_every_shipped_config_validates(path):
    load_config(path)


def test_every_shipped_sweep_validates():
    from pathlib import Path

    from rntp.sweep import plan, load_sweep

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


def test_readme_configuration_table_is_generated_from_the_models():
    """Every key of every section has a docstring, and the README's table is `config_table()`
    (run `python -m rntp.config` after changing a field)."""
    from pathlib import Path

    from pydantic import BaseModel

    from rntp.config import config_table, render_readme_table

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
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert render_readme_table(readme) == readme, "README's configuration table is stale: run python -m rntp.config"
