"""Ablation sweeps: a grid or list of overrides on one base config, run locally one after
another or submitted as a SLURM job array (submitit). Every run's config is validated before
anything starts; finished runs are skipped on re-run, interrupted ones resume.

Sweep file (YAML):

    name: rewards                   # wandb group and default output folder runs/sweeps/<name>
    base: configs/demo.yaml         # the config every run starts from
    overrides: [train.steps=30]     # applied to every run
    grid:                           # the cartesian product of these values
      reward.name: [target_logprob, info_gain]
      train.seed: [0, 1]
    runs:                           # and/or named runs with their own overrides (crossed with grid)
      - {name: kl, overrides: [grpo.kl_coef=0.05]}
    seeds: [0, 1]                   # every run once per seed (sets train.seed and data.seed)
    executor: local                 # or slurm
    slurm: {partition: gpu, timeout_min: 240, gpus_per_node: 1, cpus_per_task: 16, array_parallelism: 8}
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from rntp.config import Config, ConfigError, Section, load_config, parse_yaml


class NamedRun(Section):
    name: str
    overrides: list[str] = []


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    timeout_min: int = Field(240, ge=1)
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    mem_gb: int | None = None
    array_parallelism: int = Field(8, ge=1)
    cluster: str | None = Field(None, description="submitit cluster override: 'local' or 'debug' to try an array here")
    extra: dict[str, Any] = {}


class SweepConfig(Section):
    name: str
    base: str
    overrides: list[str] = []
    grid: dict[str, list[Any]] = {}
    runs: list[NamedRun] = []
    seeds: list[int] = Field([], description="each run once per seed (train.seed and data.seed)")
    out_dir: str | None = None
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig = SlurmConfig()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).replace("=", "-")


def _value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def expand(sweep: SweepConfig) -> list[tuple[str, list[str]]]:
    """(run name, overrides) for every run of the sweep."""
    axes = dict(sweep.grid)
    keys = list(axes)
    grid = [list(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))] or [[]]
    if sweep.seeds:
        grid = [combo + [("seed", s)] for combo in grid for s in sweep.seeds]
    named = sweep.runs or [NamedRun(name="")]
    out = []
    for run in named:
        for combo in grid:
            parts = ([run.name] if run.name else []) + [f"{k.split('.')[-1]}={_value(v)}" for k, v in combo]
            name = _slug("__".join(parts)) or "run"
            settings = [f"{k}={_value(v)}" for k, v in combo if k != "seed"]
            settings += [f"{k}={v}" for k2, v in combo if k2 == "seed" for k in ("train.seed", "data.seed")]
            out.append((name, [*sweep.overrides, *run.overrides, *settings]))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep {sweep.name!r} gives two runs the same name: {names}")
    return out


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        return SweepConfig.model_validate(parse_yaml(path.read_text(), str(path)) or {})
    except ValidationError as e:
        lines = [f"invalid sweep {path}:"] + [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def plan(sweep: SweepConfig) -> list[dict]:
    """Every run with its validated config; raises before anything runs if one is invalid."""
    from rewards import get_reward, reward_names

    out_dir = out_dir_of(sweep)
    runs = []
    for name, overrides in expand(sweep):
        run_dir = out_dir / name
        overrides = [*overrides, f"run_dir={run_dir}", f"log.wandb_group={sweep.name}"]
        try:
            cfg = load_config(sweep.base, overrides)
            for reward in reward_names(cfg.reward):
                get_reward(reward)
        except (ConfigError, KeyError) as e:
            raise ConfigError(f"sweep {sweep.name!r}, run {name!r}: {e.args[0]}") from None
        runs.append({"name": name, "run_dir": run_dir, "overrides": overrides, "config": cfg,
                     "status": status(cfg)})
    return runs


def status(cfg: Config) -> str:
    """finished (final checkpoint written), partial (resumable), or new."""
    from rntp.checkpoint import find_checkpoint, load_trainer_state

    try:
        latest = find_checkpoint(cfg.run_dir)
    except FileNotFoundError:
        return "new"
    return "finished" if load_trainer_state(latest)["step"] >= cfg.train.steps else "partial"


def command(sweep: SweepConfig, run: dict) -> list[str]:
    resume = [f"resume={run['run_dir']}"] if run["status"] == "partial" else []
    return [sys.executable, "-m", "rntp", "train", "--config", sweep.base, *run["overrides"], *resume]


def _run_one(cmd: list[str], log_path: str) -> int:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def out_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.out_dir or Path("runs") / "sweeps" / sweep.name)


def run_sweep(path: str | Path, dry_run: bool = False) -> list[dict]:
    sweep = load_sweep(path)
    runs = plan(sweep)
    todo = [r for r in runs if r["status"] != "finished"]
    for r in runs:
        print(f"[{r['status']:>8}] {r['name']}: {' '.join(command(sweep, r)[3:])}")
    if dry_run or not todo:
        return runs
    if sweep.executor == "local":
        for r in todo:
            print(f"running {r['name']} (log: {r['run_dir'] / 'train.log'})", flush=True)
            code = _run_one(command(sweep, r), str(r["run_dir"] / "train.log"))
            r["status"] = "finished" if code == 0 else f"failed ({code})"
        done = [str(r["run_dir"]) for r in runs if (r["run_dir"] / "metrics.jsonl").exists()]
        if done:
            from rntp.compare import compare

            print(f"comparison: {compare(done, out_dir_of(sweep) / 'compare')}")
    else:
        submit_slurm(sweep, todo)
    return runs


def submit_slurm(sweep: SweepConfig, runs: list[dict]) -> list:
    """One SLURM job array, one task per run, through submitit."""
    import submitit

    s = sweep.slurm
    folder = out_dir_of(sweep) / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params = dict(name=f"rntp-{sweep.name}", timeout_min=s.timeout_min, nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                  cpus_per_task=s.cpus_per_task, slurm_array_parallelism=s.array_parallelism)
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.account:
        params["slurm_account"] = s.account
    params.update({f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in s.extra.items()})
    executor.update_parameters(**params)
    jobs = executor.map_array(_run_one, [command(sweep, r) for r in runs],
                              [str(r["run_dir"] / "train.log") for r in runs])
    for r, job in zip(runs, jobs):
        r["status"] = f"submitted ({job.job_id})"
        print(f"submitted {r['name']} as job {job.job_id}")
    return jobs
