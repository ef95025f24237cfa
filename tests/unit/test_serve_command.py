"""`rntp serve`'s command, read by the installed vLLM: a supported entry point, and every flag we pass
parsed by vLLM's own server parser (the one `vllm serve` builds too) to the value we mean."""

import importlib.util
from pathlib import Path

import pytest

from rntp.config import load_config
from rollout.vllm_utils import vllm_available
from rollout.server import serve_command

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]


SECRET = "s3cret-" + "x" * 32


def command(*overrides, vllm_args=()):
    cfg = load_config(None, ["rollout.server.weight_transfer=gloo", "train.seed=5", *overrides])
    argv, env = serve_command("/models/m", cfg, host="127.0.0.1", port=8123, max_model_len=300,
                              vllm_args=list(vllm_args), secret=SECRET)
    assert argv[1] == "-m" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["RNTP_SERVER_SECRET"] == SECRET and not any(SECRET in a for a in argv)  # never on the command line
    return argv[2], argv[3:]


def test_the_server_module_is_a_supported_entry_point():
    module, _ = command()
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    source = Path(spec.origin).read_text()
    assert 'if __name__ == "__main__":' in source  # runnable with python -m
    assert "deprecated" not in source.lower(), f"{module} is deprecated"


@pytest.mark.parametrize("cuda", [False, True])
def test_every_flag_we_pass_means_what_we_mean_to_vllm(cuda, monkeypatch):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    _, argv = command("rollout.vllm.gpu_memory_utilization=0.45", "rollout.vllm.enforce_eager=true",
                      "model.dtype=bfloat16", vllm_args=["--tensor-parallel-size", "8"])
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert args.model == "/models/m" and args.host == "127.0.0.1" and args.port == 8123
    assert args.generation_config == "vllm"  # vLLM's neutral sampling defaults, not the model's
    assert args.max_model_len == 300 and args.seed == 5 and args.enforce_eager is True
    assert args.dtype == "bfloat16" and args.tensor_parallel_size == 8
    assert args.middleware == ["rollout.auth.SecretMiddleware"]  # every route guarded (vLLM's --middleware)
    backend = args.weight_transfer_config
    assert (backend["backend"] if isinstance(backend, dict) else backend.backend) == "gloo"
    if cuda:
        assert args.gpu_memory_utilization == 0.45
    else:
        assert "--gpu-memory-utilization" not in argv  # the CPU backend sizes its KV cache from the env


def test_the_middleware_is_what_vllm_can_add():
    """vLLM imports each --middleware path and adds a class with `app.add_middleware(cls)`, no arguments
    (vllm/entrypoints/serve/middleware/register.py)."""
    import importlib
    import inspect

    _, argv = command()
    path = argv[argv.index("--middleware") + 1]
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert inspect.isclass(cls)
    assert list(inspect.signature(cls).parameters) == ["app"]


def test_an_api_key_for_vllm_is_refused():
    with pytest.raises(ValueError, match="drop --api-key"):
        command(vllm_args=["--api-key", "abc"])
