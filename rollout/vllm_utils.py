"""vLLM helpers shared by the in-process engine (`vllm_sampler.py`) and the servers (`server.py`):
whether vLLM is installed, an engine's dtype and CPU KV-cache size, and the sampling request."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from rollout.base import SamplingSpec

if TYPE_CHECKING:
    from rntp.config import VllmConfig


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_dtype(model_dtype: str, vllm_cfg: VllmConfig) -> str:
    """A vLLM engine's dtype, in-process or served: `rollout.vllm.dtype`, or the trainer's for auto."""
    choice = vllm_cfg.dtype
    return model_dtype if choice == "auto" else choice


def cpu_kv_cache_space(vllm_cfg: VllmConfig) -> str:
    """VLLM_CPU_KVCACHE_SPACE (whole GiB, at least 1) for `rollout.vllm.kv_cache_gb`."""
    return str(max(1, round(vllm_cfg.kv_cache_gb)))


def thought_request(spec: SamplingSpec, index: int, close_tag: str, close_ids: list[int] | None = None) -> dict:
    """vLLM's sampling fields for the `index`-th prompt of a call, the same in-process and over HTTP.

    Seeds (`spec.seeded`, `rollout.seed_requests`): vLLM seeds each sample's generator, and gives
    sample j of an n-sample request the seed `seed + j` (vllm/v1/engine/parallel_sampling.py), so each
    prompt gets its own block of n seeds; no two samples of a call share one (seed + 1 for the next
    prompt would repeat its sample 1). A seeded
    request costs throughput: vLLM draws each seeded request's noise in a Python loop at every decode step
    (`random_sample`, vllm/v1/sample/ops/topk_topp_sampler.py). FlashInfer's sampler is out either way:
    vLLM takes it only outside the processed log-prob modes, and RNTP's engines run in one.
    Sampling: only temperature and top_p shape it. The other fields are sent with vLLM's neutral
    values, since a server fills each field a request leaves unset from the model's
    generation_config.json (top_k, min_p, penalties), which would sample off-policy.
    A thought ends at the close tag or the budget, never at EOS; a close tag that is one token (an added
    special token, which vLLM leaves out of the text it matches stop strings against) stops by its id.
    `logprobs=0`: the log-prob of each sampled token comes back with it (the engines run in vLLM's
    processed_logprobs mode, so these are the behaviour log-probs, after temperature and top-p)."""
    return dict(n=spec.n, max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p, logprobs=0,
                top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                stop=[close_tag], include_stop_str_in_output=True, ignore_eos=True,
                **({"seed": (spec.seed * 1_000_003 + index) * spec.n} if spec.seeded else {}),
                **({"stop_token_ids": list(close_ids)} if close_ids and len(close_ids) == 1 else {}))
