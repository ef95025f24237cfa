"""vLLM in-process sampler (the default wherever vLLM is installed).

On CPU it runs vLLM's single-process engine ("uni" executor, no V1 multiprocessing);
new weights go in through `reload_weights`, the path that works with vLLM's CPU kernels.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from rollout.base import SamplingSpec
from rollout.spans import Rollout, ThinkTags

log = logging.getLogger(__name__)


class VLLMSampler:
    def __init__(self, model_path: str, tags: ThinkTags, *, dtype: str = "float32", seed: int = 0,
                 max_model_len: int = 2048, cfg=None):
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(getattr(cfg, "kv_cache_gb", 2)))))
        from vllm import LLM

        import torch.distributed as dist

        self.tags = tags
        # Under torchrun every rank runs its own engine inside the training world ("external_launcher",
        # vLLM's colocation mode); a single process runs the in-process "uni" executor.
        colocated = dist.is_initialized() and dist.get_world_size() > 1
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=getattr(cfg, "enforce_eager", True),
                      distributed_executor_backend="external_launcher" if colocated else "uni")
        if on_gpu:
            kwargs["gpu_memory_utilization"] = getattr(cfg, "gpu_memory_utilization", 0.3)
        self.llm = LLM(**kwargs)

    def requests(self, prompts: list[list[int]], spec: SamplingSpec):
        """The vLLM requests for `prompts`; also used by the benchmark to time raw generate."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # One seed per request: vLLM seeds each request's generator, so equal seeds on equal
        # prompts would give equal thoughts.
        params = [
            SamplingParams(n=spec.n, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p,
                           seed=spec.seed * 1_000_003 + i, stop=[self.tags.close_tag],
                           include_stop_str_in_output=True, ignore_eos=True, detokenize=True)
            for i in range(len(prompts))
        ]
        return [TokensPrompt(prompt_token_ids=p) for p in prompts], params

    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        inputs, params = self.requests(prompts, spec)
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        rollouts = []
        for group, out in enumerate(outputs):
            for completion in sorted(out.outputs, key=lambda c: c.index):
                rollouts.append(self.tags.finish(group, prompts[group], list(completion.token_ids)))
        return rollouts

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        weights = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float | None]]:
        """log p(token_t | tokens_<t) for every token of each sequence, as vLLM computes it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            row = [None]
            for tok, entry in zip(seq[1:], out.prompt_logprobs[1:]):
                row.append(entry[tok].logprob)
            result.append(row)
        return result

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # best effort: the process may be exiting anyway
            pass
        del self.llm
