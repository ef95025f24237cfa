"""A gloo weight-transfer backend for vLLM servers, for machines without NCCL.

vLLM's weight-transfer API (`vllm.distributed.weight_transfer`) moves trainer weights into a
running server: the trainer calls the server's `/init_weight_transfer_engine`,
`/start_weight_update`, `/update_weights` and `/finish_weight_update` routes while both sides
meet in a process group. Its built-in backends (nccl, ipc) need GPUs. This module adds the
same protocol over a gloo group, so server-mode rollouts run, and are tested, on CPU. On GPUs
use vLLM's own "nccl" backend; `rollout.server.weight_transfer: auto` picks it.

The worker side is registered in the server process through vLLM's plugin entry point
(`vllm.general_plugins` in pyproject.toml), so a server started with
`--weight-transfer-config '{"backend": "gloo"}'` finds it.

Wire format: one broadcast per bucket of the trainer's weights (about `bucket_mb`), the
bucket's tensors packed byte by byte; the `/update_weights` call that precedes each broadcast
names the tensors, their dtypes and shapes.

What the group trusts. The trainer hands each server, over its `/init_weight_transfer_engine` route
(guarded by the shared secret, `rollout.auth`), the address and port where trainer rank 0 hosts the
group's store; the server's workers connect there and take whatever rank 0 broadcasts as weights.
A worker refuses an `init` whose `auth` is not the token derived from its server's secret, so only
the secret's holder can point it at a group, even where the HTTP route were reachable some other way.
The group itself (torch's TCPStore and gloo sockets; NCCL's likewise) is not authenticated: whoever
reaches rank 0's transfer port while the group forms could join it or break it. Keep the trainer
nodes and the sampler nodes on a network only the job's machines reach, or pin
`rollout.server.transfer_port` and open it to the sampler nodes alone.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Worker side: where the trainer's group meets, and this server's first rank in it."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600
    auth: str = ""  # `rollout.auth.transfer_token` of the server's secret


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer side; `world_size` counts the trainer's sender plus every server worker; port 0
    picks a free port."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_mb: float = 256
    timeout_s: float = 600
    auth: str = ""  # passed on to the servers' workers


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """The tensors of one bucket, in the order they are packed."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float, listen=None):
    from datetime import timedelta

    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    # The timeout bounds how long a side waits for a peer that failed, instead of hanging.
    return stateless_init_torch_distributed_process_group(address, port, rank, world_size, backend="gloo",
                                                          listen_socket=listen, timeout=timedelta(seconds=timeout_s))


def broadcast_from_trainer(group, buffer: torch.Tensor) -> None:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0  # the trainer's sender is rank 0 of the transfer group
    group.broadcast([buffer], options).wait()


def pack(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def sizes(info: GlooUpdateInfo) -> list[int]:
    """Bytes of each tensor the update describes."""
    return [getattr(torch, d).itemsize * torch.Size(s).numel() for d, s in zip(info.dtype_names, info.shapes)]


def unpack(buffer: torch.Tensor, info: GlooUpdateInfo) -> list[tuple[str, torch.Tensor]]:
    nbytes = sizes(info)
    if sum(nbytes) != buffer.numel():
        raise ValueError(f"weight bucket holds {buffer.numel()} bytes, its description {sum(nbytes)}")
    out, offset = [], 0
    for name, dtype_name, shape, n in zip(info.names, info.dtype_names, info.shapes, nbytes):
        # A copy: a tensor's bytes may start at an offset its dtype cannot be viewed from.
        out.append((name, buffer[offset : offset + n].clone().view(getattr(torch, dtype_name)).view(shape)))
        offset += n
    return out


def describe(bucket: list[tuple[str, torch.Tensor]]) -> GlooUpdateInfo:
    return GlooUpdateInfo(names=[n for n, _ in bucket], dtype_names=[str(t.dtype).split(".")[-1] for _, t in bucket],
                          shapes=[list(t.shape) for _, t in bucket])


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Inference-worker side: joins the group, receives buckets, loads them into the model."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from rollout import auth

        secret = os.environ.get(auth.SECRET_ENV, "").strip()
        if not secret:
            raise PermissionError(f"gloo weight transfer: this server has no shared secret ({auth.SECRET_ENV}); "
                                  "start it with `rntp serve`")
        if not auth.matches(init_info.auth, auth.transfer_token(secret)):
            raise PermissionError("gloo weight transfer: refused an init that does not come with this server's "
                                  "shared secret")
        self.shutdown()  # a trainer that died without saying goodbye leaves its group behind
        parallel = self.parallel_config
        worker_rank = parallel.data_parallel_index * parallel.world_size + parallel.rank
        self.group = open_group(init_info.master_address, init_info.master_port,
                                init_info.rank_offset + worker_rank, init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        # Checkpoint-format weights go through vLLM's layerwise reload, as its NCCL backend does.
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # the base class syncs unconditionally, which fails on CPU
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call /init_weight_transfer_engine first")
        buffer = torch.empty(sum(sizes(update_info)), dtype=torch.uint8)
        broadcast_from_trainer(self.group, buffer)
        self.model.load_weights(unpack(buffer, update_info))

    def shutdown(self) -> None:
        if self.group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side. Every rank iterates the source (gathering shards is collective); rank 0
    alone talks to the servers and broadcasts."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool, bucket_mb: float) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_mb * 2**20
        self.group = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_mb=init_info.bucket_mb)
        if not engine.is_sender:
            return engine
        # The trainer hosts the group's store on a socket it binds itself (port 0: any free one).
        # Under torchrun, letting torch's rendezvous do it would join torchrun's own store instead.
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.bind((init_info.master_address, init_info.master_port))
        listen.listen()
        port = listen.getsockname()[1]
        workers = GlooInitInfo(init_info.master_address, port, 1, init_info.world_size, init_info.timeout_s,
                               init_info.auth)
        # The servers block in the rendezvous until the trainer joins: ask them on a side thread.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(workers))
            engine.group = open_group(init_info.master_address, port, 0, init_info.world_size, init_info.timeout_s,
                                      listen=listen)
            joined.result()
        return engine

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket, size = [], 0
        for name, tensor in self.source:
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def send_weights(self) -> None:
        if not self.is_sender:
            for _ in self.source:  # stay in step with the sender's gathers
                pass
            return
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            for bucket in self.buckets():
                # The server receives inside its /update_weights call: ask, then broadcast.
                received = pool.submit(self.client.update_weights, asdict(describe(bucket)))
                broadcast_from_trainer(self.group, pack(t for _, t in bucket))
                received.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the request thread may never return
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


def register() -> None:
    """vLLM plugin entry point; runs in every vLLM process, possibly more than once."""
    from vllm.distributed.weight_transfer import factory

    for registry, engine in ((factory.WeightTransferEngineFactory, GlooWeightTransferEngine),
                             (factory.WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine)):
        try:
            registry.register_engine(BACKEND, engine)
        except ValueError:  # already registered in this process
            pass
