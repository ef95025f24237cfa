"""vLLM in-process sampler (the default wherever vLLM is installed).

On CPU it runs vLLM's single-process engine ("uni" executor, no V1 multiprocessing);
new weights go in through `reload_weights`, the path that works with vLLM's CPU kernels.
Under torchrun each rank runs an engine inside the training world (vLLM's "external_launcher"
colocation); with `tensor_parallel_size` > 1 an engine spans that many consecutive ranks, which
then sample their prompts together. With `sleep_level` the engine frees its GPU memory between
sampling and the weight push. A LoRA run (`lora_rank`) starts the engine with vLLM's LoRA support; its
pushes reload the adapter in place on the base the engine holds (`rollout/adapter.py`), and every
request names it.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from rntp.config import VllmConfig
from rollout import adapter
from rollout.base import SamplingSpec
from rollout.spans import Rollout, ThinkTags
from rollout.vllm_utils import cpu_kv_cache_space, thought_request

log = logging.getLogger(__name__)


class VLLMSampler:
    def __init__(self, model_path: str, tags: ThinkTags, *, dtype: str = "float32", seed: int = 0,
                 max_model_len: int = 2048, cfg: VllmConfig | None = None, lora_rank: int | None = None):
        import tempfile

        import torch.distributed as dist

        cfg = cfg if cfg is not None else VllmConfig()
        self.tags = tags
        self.tp = cfg.tensor_parallel_size
        world = dist.get_world_size() if dist.is_initialized() else 1
        # Under torchrun every rank (or TP group of ranks, which pool their requests) runs an engine
        # inside the training world (vLLM's "external_launcher" colocation); a single process runs the
        # in-process "uni" executor, or lets vLLM start its own workers ("mp") for tp > 1.
        executor = "external_launcher" if world > 1 else ("mp" if self.tp > 1 else "uni")
        on_gpu = torch.cuda.is_available()
        if executor != "mp":  # the engine core in this process: weights pass as tensors, not messages
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", cpu_kv_cache_space(cfg))
        from vllm import LLM

        # collective_rpc then calls this process's own worker, which can pull a generator
        self.in_process = executor != "mp" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        self.sleep_level = cfg.sleep_level
        if world > 1 and world % self.tp:
            raise ValueError(f"rollout.vllm.tensor_parallel_size={self.tp} does not divide the {world} ranks")
        self.pool_requests = world > 1 and self.tp > 1
        if self.sleep_level:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"rollout.vllm.sleep_level={self.sleep_level}: vLLM has no sleep mode on "
                                 f"{current_platform.device_name}; set it to 0")
        # processed_logprobs: a sample's log-probs are those it was drawn from (after temperature and
        # top-p), comparable with the trainer's `sampling_logprobs`.
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=cfg.enforce_eager, tensor_parallel_size=self.tp,
                      logprobs_mode="processed_logprobs",
                      enable_sleep_mode=self.sleep_level > 0,
                      distributed_executor_backend=executor)
        if lora_rank is not None:  # one adapter, the policy's (max_loras=1), of up to this rank
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=adapter.vllm_max_lora_rank(lora_rank))
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:  # a seeded request split over steps by chunked prefill kills vLLM 0.32's CPU engine (it rewinds
            kwargs["enable_chunked_prefill"] = False  # the request's generator: "CPU Generator does not use offset")
        self.llm = LLM(**kwargs)
        self.asleep = False
        # LoRA: where this rank writes the adapter for its engine, and the request that names it (after the
        # first push; until then requests go to the base)
        self.adapter_dir = tempfile.mkdtemp(prefix="rntp-adapter-") if lora_rank is not None else None
        self.lora_request = None

    def _pooled(self, mine):
        """Every rank's `mine`, over this rank's tensor-parallel group (whose ranks must all submit the
        same requests), and this rank's index in it."""
        if not self.pool_requests:
            return [mine], 0
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        pooled = [None] * self.tp
        dist.all_gather_object(pooled, mine, group=group.cpu_group)
        return pooled, group.rank_in_group

    def _generate(self, per_member, params_of, one_by_one: bool = False):
        """Generate every TP-group member's requests in one call (`one_by_one`: a call per request, in the
        same order on every member); this rank's outputs back."""
        self.wake_up()
        pooled, me = self._pooled(per_member)
        inputs, params, spans = [], [], []
        for member in pooled:
            member_inputs, member_params = params_of(member)
            spans.append((len(inputs), len(inputs) + len(member_inputs)))
            inputs += member_inputs
            params += member_params
        if one_by_one:
            outputs = [out for i, p in zip(inputs, params)
                       for out in self.llm.generate([i], [p], use_tqdm=False, lora_request=self.lora_request)]
        else:
            outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora_request)
        start, end = spans[me]
        return outputs[start:end]

    def wake_up(self) -> None:
        if self.asleep:
            self._free_cache()
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Free the engine's accelerator memory until the next push or sample (sleep_level > 0)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def requests(self, prompts: list[list[int]], spec: SamplingSpec):
        """The vLLM requests for `prompts`; also used by the benchmark to time raw generate."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(**thought_request(spec, i, self.tags.close_tag, self.tags.close_ids), detokenize=True)
                  for i in range(len(prompts))]
        return [TokensPrompt(prompt_token_ids=p) for p in prompts], params

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        outputs = self._generate((prompts, spec), lambda member: self.requests(*member))
        rollouts = []
        for group, out in enumerate(outputs):
            if list(out.prompt_token_ids) != prompts[group]:  # pooled TP requests came back misaligned
                raise RuntimeError(f"vLLM answered prompt {group} with another prompt's completions")
            for completion in sorted(out.outputs, key=lambda c: c.index):
                behaviour = [entry[tok].logprob for tok, entry in zip(completion.token_ids, completion.logprobs)]
                rollouts.append(self.tags.finish(group, prompts[group], list(completion.token_ids), behaviour))
        return rollouts

    def push_weights(self, weights: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """All buckets in one `reload_weights` call. Each call is a whole reload cycle (vLLM readies
        every layer, loads, then finalises every layer), so a bucket that ended between q_proj and
        k_proj, or gate and up, would leave the fused qkv/gate_up layer partly unloaded. A LoRA stream
        (`weights.adapter`) is written to this rank's adapter folder and reloaded in place instead."""
        if getattr(weights, "adapter", None) is not None:
            self._push_adapter(weights)
            return
        if self.asleep:  # weights first, so the KV cache is not allocated while they load
            self._free_cache()
            self.llm.wake_up(tags=["weights"])
        # Every rank of a TP group passes the full tensors; each keeps its own shard.
        tensors = ((n, t.detach()) for bucket in weights for n, t in bucket)
        if self.in_process:  # the engine pulls bucket after bucket (gathered on demand) as it loads
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        else:  # worker processes need the tensors themselves, not a generator
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(tensors)})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def _push_adapter(self, weights) -> None:
        """The adapter into the engine under the one id it serves, reloaded in place (`rollout/adapter.py`);
        the base weights stay as the engine loaded them. Every rank of a TP group writes and loads its own."""
        from vllm.lora.request import LoRARequest

        if self.adapter_dir is None:
            raise ValueError("a LoRA adapter was pushed to a vLLM engine started without LoRA (lora_rank)")
        self.wake_up()  # sleep level 1 keeps the base in CPU memory; the adapter loads into the woken engine
        adapter.save_adapter(self.adapter_dir, dict(weights.tensors()), weights.adapter)
        self.llm.llm_engine.add_lora(LoRARequest(adapter.NAME, adapter.ID, self.adapter_dir, load_inplace=True))
        self.lora_request = LoRARequest(adapter.NAME, adapter.ID, self.adapter_dir)
        self.llm.reset_prefix_cache()

    @staticmethod
    def _free_cache() -> None:
        """Hand the trainer's cached but unused accelerator blocks back before vLLM allocates again."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of each sequence, as vLLM computes it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        # vLLM 0.32's CPU LoRA head applies the adapter index of each request to a call's prompt-logprob rows
        # (punica_cpu.add_lora_logits: `sampler_indices`, one per request): right only for one request a call
        one_by_one = self.lora_request is not None and not torch.cuda.is_available()
        outs = self._generate(sequences, lambda seqs: ([TokensPrompt(prompt_token_ids=s) for s in seqs],
                                                       [params] * len(seqs)), one_by_one=one_by_one)
        result = []
        for seq, out in zip(sequences, outs):
            row = [None]
            for tok, entry in zip(seq[1:], out.prompt_logprobs[1:]):
                row.append(entry[tok].logprob)
            result.append(row)
        return result

    def close(self) -> None:
        import shutil

        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process may be exiting anyway
            pass
        del self.llm
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
