"""Launch scripts: shellcheck-clean, and their dry runs resolve the commands a cluster would run."""

import os
import shlex
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


def test_server_mode_dry_run_gives_the_first_nodes_to_vllm_servers(tmp_path):
    out = dry_run("multi_node.sbatch", "--config", "configs/demo.yaml", DRY_RUN_HOSTS="gpu-a gpu-b gpu-c gpu-d",
                  SERVER_NODES="2", SERVER_PORT="8100", SLURM_JOB_ID="5", NPROC="8", RUN_DIR=str(tmp_path / "r"))
    lines = [line for line in out.splitlines() if line.startswith("srun on")]
    servers, trainers = lines[:2], lines[2:]
    for host, line in zip(["gpu-a", "gpu-b"], servers):
        assert line.startswith(f"srun on {host} -> server:")
        assert "-m rntp serve --port 8100 --config configs/demo.yaml" in line
        assert line.endswith("-- --tensor-parallel-size 8")  # one server per node over its 8 GPUs
    assert len(trainers) == 2
    for rank, (host, line) in enumerate(zip(["gpu-c", "gpu-d"], trainers)):
        assert line.startswith(f"srun on {host} -> node {rank}:")
        assert "--nnodes=2" in line and "--rdzv-endpoint=gpu-c:" in line  # training rendezvous off the servers
        argv = shlex.split(line.split(": ", 1)[1])  # the dry run prints shell-quoted words
        assert argv[-3:-1] == ["rollout.sampler=server", "rollout.server.urls=[http://gpu-a:8100,http://gpu-b:8100]"]


def test_server_mode_needs_a_node_left_for_training():
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(ROOT / "launch" / "multi_node.sbatch"), "--config", "configs/demo.yaml"],
                          env={**full_env, "DRY_RUN": "1", "DRY_RUN_HOSTS": "gpu-a", "SERVER_NODES": "1"},
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "leaves no node of 1 for training" in done.stderr


def sbatch_log_paths():
    """Every `#SBATCH --output/--error` (or -o/-e) path in the templates, with its template."""
    found = []
    for script in SCRIPTS:
        for line in Path(script).read_text().splitlines():
            words = line.split()
            if words[:1] != ["#SBATCH"] or len(words) < 2:
                continue
            option, _, value = words[1].partition("=")
            if option in ("--output", "--error") or (option in ("-o", "-e") and len(words) > 2):
                found.append((Path(script).name, value or words[2]))
    return found


def test_sbatch_logs_go_where_a_fresh_clone_has_a_folder():
    """SLURM opens --output/--error before the script runs and does not create folders: a log path
    into a folder a fresh clone lacks (runs/ is git-ignored) fails the job before it starts."""
    paths = sbatch_log_paths()
    assert {name for name, _ in paths} >= {"single_node.sbatch", "multi_node.sbatch"}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked_dirs = {str(Path(f).parent) for f in tracked} | {str(p) for f in tracked for p in Path(f).parents}
    for name, path in paths:
        folder = str(Path(path).parent)
        assert not Path(path).is_absolute() and "%" not in folder, (name, path)
        assert folder == "." or folder in tracked_dirs, f"{name}: {path} is in a folder a fresh clone lacks"


def test_server_mode_hands_servers_and_trainers_one_secret_file_per_job(tmp_path):
    """Servers listen on every interface (the trainers are on other nodes) and, like the trainers, get
    the path of the job's secret file, never a secret; a dry run makes no file."""
    run_dir = tmp_path / "r"
    out = dry_run("multi_node.sbatch", "--config", "configs/demo.yaml", DRY_RUN_HOSTS="gpu-a gpu-b gpu-c",
                  SERVER_NODES="1", SLURM_JOB_ID="6", NPROC="8", RUN_DIR=str(run_dir))
    lines = [shlex.split(line.split(": ", 1)[1]) for line in out.splitlines() if line.startswith("srun on")]
    server, trainers = lines[0], lines[1:]
    assert server[server.index("--host") + 1] == "0.0.0.0"
    wanted = f"rollout.server.secret_file={run_dir / 'server-secret'}"
    assert server.index(wanted) > server.index("configs/demo.yaml")  # after the user's: the launcher's file wins
    assert all(wanted in argv for argv in trainers)
    assert not run_dir.exists()
    mine = tmp_path / "mine"
    out = dry_run("multi_node.sbatch", "--config", "configs/demo.yaml", DRY_RUN_HOSTS="gpu-a gpu-b",
                  SERVER_NODES="1", SLURM_JOB_ID="6", RUN_DIR=str(run_dir), SERVER_SECRET_FILE=str(mine))
    assert out.count(f"rollout.server.secret_file={mine}") == 2
    out = dry_run("single_node.sbatch", "--config", "configs/demo.yaml", SLURM_JOB_ID="6", RUN_DIR=str(run_dir))
    assert "secret" not in out  # no servers, no secret


def test_a_job_secret_is_new_random_and_only_its_owner_can_read_it(tmp_path):
    import stat

    path = tmp_path / "run" / "server-secret"
    made = []
    for _ in range(2):
        done = subprocess.run(["bash", str(ROOT / "launch" / "make_secret.sh"), str(path)], capture_output=True,
                              text=True, env={**os.environ, "PATH": os.environ["PATH"]})
        assert done.returncode == 0 and done.stdout == done.stderr == ""  # nothing reaches a log
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        made.append(path.read_text())
        assert len(made[-1]) == 64 and int(made[-1], 16) >= 0
    assert made[0] != made[1] and sorted(p.name for p in path.parent.iterdir()) == ["server-secret"]

    from rollout.auth import load_secret

    assert load_secret(str(path))[0] == made[1]  # what `rntp serve` and the trainers read
