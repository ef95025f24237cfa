"""Launch scripts: shellcheck-clean, and their dry runs resolve the commands a cluster would run."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p) for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck") or str(Path(os.sys.executable).with_name("shellcheck"))
    done = subprocess.run([shellcheck, *SCRIPTS], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def dry_run(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update({"DRY_RUN": "1", **env})
    done = subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_multi_node_dry_run_resolves_one_torchrun_per_node(tmp_path):
    out = dry_run("multi_node.sbatch", "--config", "configs/demo.yaml", "train.steps=5",
                  DRY_RUN_HOSTS="gpu-a gpu-b gpu-c", SLURM_JOB_ID="4242", NPROC="8", RUN_DIR=str(tmp_path / "r"))
    lines = [line for line in out.splitlines() if line.startswith("srun on")]
    assert len(lines) == 3
    for rank, (line, host) in enumerate(zip(lines, ["gpu-a", "gpu-b", "gpu-c"])):
        assert line.startswith(f"srun on {host} -> node {rank}:")
        assert f"--nnodes=3 --node-rank={rank} --nproc-per-node=8" in line
        assert "--rdzv-backend=c10d --rdzv-endpoint=gpu-a:24242 --rdzv-id=4242" in line
        assert line.endswith(f"-m rntp train --config configs/demo.yaml train.steps=5 run_dir={tmp_path / 'r'}")
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_requeued_job_resumes_from_its_run_dir(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_000010\n")
    out = dry_run("single_node.sbatch", "--config", "configs/demo.yaml", SLURM_JOB_ID="7", RUN_DIR=str(run_dir))
    assert f"run_dir={run_dir} resume={run_dir}" in out


def test_local_torchrun_dry_run():
    out = dry_run("torchrun.sh", "--config", "configs/demo.yaml", NPROC="2")
    assert "--nnodes=1 --node-rank=0 --nproc-per-node=2" in out and "-m rntp train --config configs/demo.yaml" in out
