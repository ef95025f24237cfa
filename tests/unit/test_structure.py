"""The package layout: no import circles between project modules, dependencies pointing one way
(DESIGN: `rntp` uses `rewards` and `rollout`; those never import the training loop), and the
pieces the refactor of issue 9 moved (engine factory, metric reductions, helpers)."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rntp", "rewards", "rollout")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Project modules `path` imports: at module level only (what runs on import; `if TYPE_CHECKING`
    blocks left out), or anywhere (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            visit(ast.iter_child_nodes(node))

    visit(tree.body)
    known = project_modules()
    return {m for m in found if m in known}


def test_no_import_circles():
    """Module-level imports between project modules form no cycle (so each imports on its own)."""
    modules = project_modules()
    graph = {m: imports(p, top_level_only=True) - {m} for m, p in modules.items()}
    for m in modules:  # importing a submodule first imports its packages
        parent = m.rpartition(".")[0]
        if parent:
            graph[m].add(parent)
    state: dict[str, int] = {}

    def walk(m, path):
        state[m] = 1
        for n in graph[m]:
            if n == m.rpartition(".")[0] and m in graph.get(n, ()):  # a package importing its own submodule
                continue
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                walk(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])


def test_dependencies_point_one_way():
    """rewards/ and rollout/ never import the training loop; evaluation, config and the engines do
    not either; the CLI imports it only to run `rntp train`."""
    modules = project_modules()
    for name, path in modules.items():
        anywhere = imports(path, top_level_only=False)
        if name.startswith(("rewards", "rollout")) or name in (
                "rntp.experiments.evaluate", "rntp.config", "rntp.models", "rntp.forward.scoring",
                "rntp.distributed") or name.startswith("rntp.engines"):
            assert not {m for m in anywhere if m.startswith("rntp.train")}, name
    cli = imports(modules["rntp.cli"], top_level_only=False)
    assert {m for m in cli if m.startswith("rntp.train")} <= {"rntp.train", "rntp.train.train"}
    assert "rollout.server" not in imports(modules["rntp.distributed"], top_level_only=False)


def test_every_module_imports():
    import importlib

    for name in project_modules():
        if name == "rntp.__main__" or name == "rollout.weight_transfer":  # runs the CLI; a vLLM plugin
            continue
        importlib.import_module(name)


def test_engine_factory_picks_one_class_per_backend():
    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import (DDPEngine, DeepSpeedEngine, FSDP2Engine, PlainEngine, engine_class, make_engine,
                              resolve_backend)

    def cls(backend, world, *extra):
        return engine_class(load_config(None, [f"dist.backend={backend}", *extra]), world)

    assert cls("auto", 1) is PlainEngine and cls("auto", 2) is DDPEngine and cls("none", 1) is PlainEngine
    assert cls("deepspeed", 2) is DeepSpeedEngine and cls("fsdp2", 2) is FSDP2Engine
    assert resolve_backend(load_config(None, []), 4) == "ddp"
    assert not PlainEngine.shards_weights(load_config(None, []))
    assert FSDP2Engine.shards_weights(load_config(None, ["dist.backend=fsdp2"]))
    assert DeepSpeedEngine.shards_weights(load_config(None, ["dist.backend=deepspeed", "dist.zero_stage=3"]))
    assert not DeepSpeedEngine.shards_weights(load_config(None, ["dist.backend=deepspeed", "dist.zero_stage=2"]))

    cfg = load_config(None, ["optim.lr=0.1", "optim.schedule=linear", "train.steps=4"])
    model = torch.nn.Linear(3, 2)
    engine = make_engine(model, cfg, DistInfo(), passes=3, total_steps=4)
    assert type(engine) is PlainEngine and engine.model is model and engine.fixed_passes is None
    with pytest.raises(ValueError, match="several processes"):
        PlainEngine(model, cfg, DistInfo(world_size=2), 3, 4)
    assert DDPEngine.fixed_passes.fget(type("E", (), {"passes": 3, "info": DistInfo(world_size=2)})()) == 3
    before = model.weight.detach().clone()
    engine.backward(model(torch.ones(1, 3)).sum())
    assert engine.step() > 0 and not torch.equal(before, model.weight)
    assert engine.lr() == pytest.approx(0.1)
    engine.step_scheduler()
    assert engine.lr() == pytest.approx(0.1 * 3 / 4)  # linear decay over train.steps
    state = engine.save(Path("unused"))
    fresh = make_engine(torch.nn.Linear(3, 2), cfg, DistInfo(), 3, 4)
    fresh.load(Path("unused"), state)
    assert fresh.lr() == pytest.approx(engine.lr())
    names = [n for bucket in engine.weights(bucket_mb=1) for n, _ in bucket]
    assert names == ["weight", "bias"]


def test_metric_reductions_are_declared_per_metric():
    from rntp.metrics import MetricsRow, reduce_rows

    def row(rank):
        r = MetricsRow()
        r.add({"reward/mean": 1.0 + rank, "mismatch/max_abs_log_ratio": 0.5 * rank, "note": "text"})
        r.add({"groups/dropped_nonfinite": 1, "tokens_per_s/sample": 10.0 * (rank + 1)}, "sum")
        r.add({"time/step": 2.0 + rank, "custom/worst": -rank}, "max")
        r.add({"reward/std": None if rank else 3.0})
        return r

    out = reduce_rows([row(0), row(1)])
    assert out == {"reward/mean": 1.5, "mismatch/max_abs_log_ratio": 0.25, "note": "text",
                   "groups/dropped_nonfinite": 2, "tokens_per_s/sample": 30.0, "time/step": 3.0,
                   "custom/worst": 0, "reward/std": 3.0}


def test_helpers_where_they_moved():
    from rntp.config import load_config, max_sequence_len
    from rollout import make_sampler
    from rollout.net import free_port
    from rollout.vllm_utils import cpu_kv_cache_space, engine_dtype

    class Tags:
        open_ids, close_ids = [1, 2], [3]

    cfg = load_config(None, ["data.chunk_tokens=100", "rollout.max_thought_tokens=20"])
    assert max_sequence_len(cfg, Tags()) == 100 + 2 + 20 + 1 + 8
    assert max_sequence_len(load_config(None, ["rollout.vllm.max_model_len=77"]), Tags()) == 77
    assert 0 < free_port() < 65536
    assert engine_dtype("bfloat16", cfg.rollout.vllm) == "bfloat16"
    assert engine_dtype("float32", load_config(None, ["rollout.vllm.dtype=bfloat16"]).rollout.vllm) == "bfloat16"
    assert cpu_kv_cache_space(load_config(None, ["rollout.vllm.kv_cache_gb=0.2"]).rollout.vllm) == "1"
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("nope", "", None)


def test_layout_page_matches_the_tree():
    """Every file docs/layout.md names exists in its folder, and every module of the packages it
    details is named there."""
    import re

    layout = (ROOT / "docs" / "layout.md").read_text()
    for line in layout.splitlines():
        match = re.match(r"\| `([\w/]+)/` \| (.*) \|$", line)
        if not match:
            continue
        folder, text = ROOT / match.group(1), match.group(2)
        named = set(re.findall(r"`([\w]+\.py)`", text))
        for name in named:
            assert (folder / name).is_file(), f"docs/layout.md names {match.group(1)}/{name}, which does not exist"
        if match.group(1) in ("rntp", "rewards", "rollout") or match.group(1).startswith("rntp/"):  # every module
            present = {p.name for p in folder.glob("*.py")} - {"__init__.py"}
            assert present <= named, f"{match.group(1)}: not in docs/layout.md: {sorted(present - named)}"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml) on the packages under `root`, lazy imports included."""
    import sys

    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--config",
                           str(root / "pyproject.toml")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_layer_contracts_hold_and_a_circle_made_on_purpose_breaks_them(tmp_path):
    """`make lint`'s import layers: kept on the tree; broken by a lower module importing a higher one
    inside a function (a lazy import, which the module-level check above cannot see)."""
    import shutil

    for name in (*PACKAGES, "pyproject.toml"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    kept = lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout[-3000:] + kept.stderr[-2000:]
    assert "2 kept, 0 broken" in kept.stdout
    config = tmp_path / "rntp" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _circle():\n    from rntp.train import train  # noqa: F401\n")
    broken = lint_imports(tmp_path)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout
    assert "rntp.config -> rntp.train" in broken.stdout
