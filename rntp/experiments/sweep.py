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
    gpus_per_run: 1                 # GPUs (processes, under torchrun when > 1) of each run, per node
    executor: local                 # or slurm
    slurm: {partition: gpu, timeout_min: 240, gpus_per_node: 1, cpus_per_task: 16, array_parallelism: 8}

Locally, runs go side by side on disjoint GPUs (CUDA_VISIBLE_DEVICES, `gpus_per_run` each), as many
at once as the visible GPUs hold, and one at a time on a machine without GPUs. Under SLURM each array
task is one run on `slurm.nodes` nodes: one torchrun per node (launch/node.sh, node rank from SLURM).
Designs that train identically (rewards whose advantages are equal under the run's advantage scale,
settings the design does not use) are named in a one-line warning before anything runs.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

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
    gpus_per_run: int = Field(1, ge=1, description="GPUs of each run (per node under SLURM); torchrun when > 1")
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _gpus_fit(self) -> "SweepConfig":
        if self.executor == "slurm" and self.slurm.gpus_per_node < self.gpus_per_run:
            raise ValueError(f"slurm.gpus_per_node={self.slurm.gpus_per_node} is below gpus_per_run="
                             f"{self.gpus_per_run}: a node could not hold one run's share")
        return self


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


# ---- designs that train identically ---------------------------------------------------------------

S0_REWARDS = {"info_gain", "vrcli"}  # read the no-think score s0 (reward.baseline)
K_REWARDS = {"next_token_accuracy", "confidence"}  # read reward.k
SURROGATE_ONLY = ("grpo.advantage_scale", "grpo.clip_low", "grpo.clip_high", "grpo.loss_aggregation",
                  "grpo.drop_negative_advantages", "grpo.mismatch_correction", "grpo.is_cap", "grpo.is_band")


def training_signature(settings: dict) -> tuple[dict, dict, dict[str, str]]:
    """A design's settings reduced to what its training depends on, in two strengths: `same`, equal for
    designs whose advantages are identical (up to GRPO's eps), and `scaled`, equal also where they differ
    by one constant factor; and why, by the setting (or prefix) each reason covers. `settings`:
    `rntp.experiments.compare.design_settings`.

    The reasoning (tested numerically against `rntp.grpo.advantages` and the reward functions):
    - the no-think score s0 is one number per position (group): info_gain = (s - s0)/H centres to
      (s - mean s)/H under every advantage scale, so it equals target_logprob_mean whatever
      reward.baseline, unless clip_min/clip_max act on it first; a reward that never reads s0 does not
      use reward.baseline at all;
    - target_logprob = H x target_logprob_mean: `group` and `batch` divide by a std, so H cancels;
      under `none` it stays a constant factor of the advantages. Not with a length penalty (which H
      does not scale), clipping, or min_group_std (a threshold on the std, which H scales);
    - with grpo.pg_coef=0 (and no min_group_std, which drops groups by reward spread) the reward and
      everything that only shapes the surrogate are unused."""
    same, notes = dict(settings), {}

    def drop(*keys):
        for key in keys:
            same.pop(key, None)

    if same.get("grpo.pg_coef") == 0 and not same.get("grpo.min_group_std"):
        unused = [k for k in SURROGATE_ONLY if k != "grpo.loss_aggregation" or not same.get("grpo.kl_coef")]
        drop(*[k for k in same if k.startswith("reward.")], *unused)  # the KL term is aggregated like the surrogate
        why = "with grpo.pg_coef=0 the reward and the surrogate's settings are unused"
        return same, same, {"reward.": why, **{k: why for k in unused}}
    if same.get("reward.weights"):
        return same, same, notes
    name = same.get("reward.name")
    clipped = same.get("reward.clip_min") is not None or same.get("reward.clip_max") is not None
    if name not in S0_REWARDS:
        drop("reward.baseline", "reward.ema_decay")
        notes["reward.baseline"] = notes["reward.ema_decay"] = f"{name} does not read the no-think score"
    if name not in K_REWARDS:
        drop("reward.k")
        notes["reward.k"] = f"{name} does not read reward.k"
    if name != "vrcli":
        drop("reward.vrcli_thresholds", "reward.vrcli_values")
    if name == "info_gain" and not clipped:
        same["reward.name"] = name = "target_logprob_mean"
        drop("reward.baseline", "reward.ema_decay")
        notes["reward.name"] = notes["reward.baseline"] = notes["reward.ema_decay"] = (
            "info_gain's no-think score is constant within a group and centring removes it (any reward.baseline): "
            "its advantages are target_logprob_mean's")
    scaled = dict(same)
    if name == "target_logprob" and not clipped and not same.get("reward.length_penalty") and \
            not same.get("grpo.min_group_std"):
        scale = same.get("grpo.advantage_scale")
        if scale in ("group", "batch"):
            same["reward.name"] = scaled["reward.name"] = "target_logprob_mean"
            notes["reward.name"] = (f"target_logprob = H x target_logprob_mean and advantage_scale={scale} "
                                    "divides by a std, so H cancels")
        else:
            scaled["reward.name"] = "target_logprob_mean"
            notes["reward.name"] = "under advantage_scale=none target_logprob's advantages are H x those of " \
                "target_logprob_mean"
    return same, scaled, notes


def equivalence_warnings(runs: list[dict]) -> list[str]:
    """One line for each pair of the sweep's designs that train identically (or with advantages one
    constant factor apart)."""
    import json

    from rntp.experiments.compare import design_name, design_settings

    key = lambda d: json.dumps(d, sort_keys=True, default=str)  # noqa: E731
    designs: dict[str, tuple[str, dict]] = {}
    for r in runs:
        settings = design_settings(r["config"].model_dump(mode="json"))
        designs.setdefault(key(settings), (design_name(r["name"]), settings))
    signed = [(name, settings, *training_signature(settings)) for name, settings in designs.values()]
    lines = []
    for i, (a, raw_a, same_a, scaled_a, notes_a) in enumerate(signed):
        for b, raw_b, same_b, scaled_b, notes_b in signed[i + 1 :]:
            differ = [k for k in set(raw_a) | set(raw_b) if key(raw_a.get(k)) != key(raw_b.get(k))]
            reasons = [note for notes in (notes_a, notes_b) for cover, note in notes.items()
                       if any(k == cover or (cover.endswith(".") and k.startswith(cover)) for k in differ)]
            why = "; ".join(dict.fromkeys(reasons))
            if key(same_a) == key(same_b):
                lines.append(f"warning: designs {a} and {b} train identically ({why})")
            elif key(scaled_a) == key(scaled_b):
                lines.append(f"warning: designs {a} and {b} differ only by a constant factor of their advantages "
                             f"({why}), which AdamW largely absorbs")
    return lines


def status(cfg: Config) -> str:
    """finished (final checkpoint written), partial (resumable), or new."""
    from rntp.checkpoint import find_checkpoint, load_trainer_state

    try:
        latest = find_checkpoint(cfg.run_dir)
    except FileNotFoundError:
        return "new"
    return "finished" if load_trainer_state(latest)["step"] >= cfg.train.steps else "partial"


def train_args(sweep: SweepConfig, run: dict) -> list[str]:
    """`rntp train`'s arguments for one run (resuming an interrupted one)."""
    resume = [f"resume={run['run_dir']}"] if run["status"] == "partial" else []
    return ["--config", sweep.base, *run["overrides"], *resume]


def command(sweep: SweepConfig, run: dict, processes: int = 1) -> list[str]:
    """The local command of one run: `python -m rntp train ...`, under torchrun (a rendezvous port of
    its own, so runs side by side do not meet) when it has several processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    return [*launcher, "-m", "rntp", "train", *train_args(sweep, run)]


def _run_one(cmd: list[str], log_path: str) -> int:
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (or 0..n-1 when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable torch / CUDA: a CPU machine
        return []


def gpu_slots(gpus: list[str], per_run: int) -> list[list[str] | None]:
    """Disjoint device sets of `per_run` GPUs each; [None] (one run at a time, devices untouched) without GPUs."""
    if not gpus:
        return [None]
    if len(gpus) < per_run:
        raise ConfigError(f"gpus_per_run={per_run} but only {len(gpus)} GPU(s) are visible here ({','.join(gpus)})")
    return [gpus[i : i + per_run] for i in range(0, len(gpus) - per_run + 1, per_run)]


def _launch(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_local(sweep: SweepConfig, todo: list[dict], poll_s: float = 2.0) -> None:
    """Every run of `todo`, as many at once as there are GPU slots, each with CUDA_VISIBLE_DEVICES set to
    its own GPUs; one at a time in one process each on a machine without GPUs. Sets each run's status."""
    slots = gpu_slots(visible_gpus(), sweep.gpus_per_run)
    if slots == [None] and sweep.gpus_per_run > 1:
        print(f"no GPUs visible: gpus_per_run={sweep.gpus_per_run} ignored, runs go one at a time in one process")
    queue, running, free = list(todo), [], list(range(len(slots)))
    while queue or running:
        while queue and free:
            r, slot = queue.pop(0), free.pop(0)
            env = dict(os.environ)
            devices = slots[slot]
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
            cmd = command(sweep, r, len(devices) if devices else 1)
            where = f" on GPU {','.join(devices)}" if devices else ""
            print(f"running {r['name']}{where} (log: {r['run_dir'] / 'train.log'})", flush=True)
            running.append((r, slot, _launch(cmd, r["run_dir"] / "train.log", env), time.monotonic()))
        for item in list(running):
            r, slot, proc, started = item
            code = proc.poll()
            if code is not None:
                r["status"] = "finished" if code == 0 else f"failed ({code})"
                print(f"{r['status']} {r['name']} in {(time.monotonic() - started) / 60:.1f} min", flush=True)
                running.remove(item)
                free.append(slot)
        if running:
            time.sleep(poll_s)


def out_dir_of(sweep: SweepConfig) -> Path:
    return Path(sweep.out_dir or Path("runs") / "sweeps" / sweep.name)


def run_sweep(path: str | Path, dry_run: bool = False) -> list[dict]:
    sweep = load_sweep(path)
    runs = plan(sweep)
    todo = [r for r in runs if r["status"] != "finished"]
    for r in runs:
        print(f"[{r['status']:>8}] {r['name']}: {' '.join(train_args(sweep, r))}")
    for line in equivalence_warnings(runs):
        print(line, flush=True)
    if dry_run or not todo:
        return runs
    if sweep.executor == "local":
        run_local(sweep, todo)
        done = [str(r["run_dir"]) for r in runs if (r["run_dir"] / "metrics.jsonl").exists()]
        if done:
            from rntp.experiments.compare import compare

            print(f"comparison: {compare(done, out_dir_of(sweep) / 'compare')}")
    else:
        submit_slurm(sweep, todo)
    return runs


LAUNCH_NODE = Path(__file__).resolve().parents[2] / "launch" / "node.sh"


def slurm_task(args: list[str], run_dir: str, gpus_per_run: int, nodes: int, job_env=None) -> int:
    """One array task = one run. Where the task spans several nodes, submitit starts this on each of
    them (one task per node); each node starts its own share once, `gpus_per_run` processes through
    launch/node.sh (torchrun, this node's rank, a rendezvous on the task's first node; a requeued task
    resumes from the run's latest checkpoint), so no node starts the run on its own in the same folder.
    A run of one process on one node runs `python -m rntp train` as the local executor does."""
    if nodes == 1 and gpus_per_run == 1:
        return _run_one([sys.executable, "-m", "rntp", "train", *args], str(Path(run_dir) / "train.log"))
    if job_env is None:
        import submitit

        job_env = submitit.JobEnvironment()
    node = job_env.node
    port = 20000 + int.from_bytes(str(job_env.job_id).encode(), "little") % 20000  # the same on every node
    env = {**os.environ, "NNODES": str(nodes), "NODE_RANK": str(node), "MASTER_ADDR": job_env.hostnames[0],
           "MASTER_PORT": str(port), "NPROC": str(gpus_per_run), "RUN_ID": f"rntp-{job_env.job_id}",
           "RUN_DIR": str(run_dir), "PYTHON": sys.executable}
    log_path = Path(run_dir) / ("train.log" if node == 0 else f"train.node{node}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        return subprocess.run(["bash", str(LAUNCH_NODE), *args], stdout=log, stderr=subprocess.STDOUT,
                              env=env).returncode


def submit_slurm(sweep: SweepConfig, runs: list[dict]) -> list:
    """One SLURM job array, one task per run (one process per node of it), through submitit."""
    import submitit

    s = sweep.slurm
    folder = out_dir_of(sweep) / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params = dict(name=f"rntp-{sweep.name}", timeout_min=s.timeout_min, nodes=s.nodes, gpus_per_node=s.gpus_per_node,
                  tasks_per_node=1, cpus_per_task=s.cpus_per_task, slurm_array_parallelism=s.array_parallelism)
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.account:
        params["slurm_account"] = s.account
    params.update({f"slurm_{k}" if not k.startswith("slurm_") else k: v for k, v in s.extra.items()})
    executor.update_parameters(**params)
    jobs = executor.map_array(slurm_task, [train_args(sweep, r) for r in runs], [str(r["run_dir"]) for r in runs],
                              [sweep.gpus_per_run] * len(runs), [s.nodes] * len(runs))
    for r, job in zip(runs, jobs):
        r["status"] = f"submitted ({job.job_id})"
        print(f"submitted {r['name']} as job {job.job_id}")
    return jobs
