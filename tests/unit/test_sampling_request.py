"""`thought_request`, the sampling fields both vLLM samplers send: seeds that never repeat within a
call, and every field vLLM's completion route would otherwise take from the model's generation
config sent explicitly, with vLLM's neutral value."""

import pytest

from rollout.base import SamplingSpec
from rollout.vllm_utils import thought_request, vllm_available

pytestmark = pytest.mark.unit


def child_seeds(request: dict) -> list[int]:
    """The seeds vLLM v1 gives the n samples of one request: the request's seed + j
    (`vllm/v1/engine/parallel_sampling.py`, `ParentRequest.get_child_sampling_params`)."""
    return [request["seed"] + j for j in range(request["n"])]


@pytest.mark.parametrize("n", [1, 2, 4, 16])
@pytest.mark.parametrize("seed", [0, 7])
def test_no_two_samples_of_a_call_share_a_seed(n, seed):
    spec = SamplingSpec(n=n, max_tokens=8, seed=seed)
    seeds = [s for i in range(64) for s in child_seeds(thought_request(spec, i, "</think>"))]
    assert len(set(seeds)) == len(seeds)


def test_neighbouring_spec_seeds_draw_disjoint_seeds():
    """Ranks and steps get neighbouring spec seeds (rntp/train.py); their calls share no seed."""
    step = [{s for i in range(64) for s in child_seeds(thought_request(SamplingSpec(n=16, max_tokens=8, seed=k),
                                                                         i, "</think>"))} for k in (3, 4)]
    assert not step[0] & step[1]


def test_sampling_fields_are_neutral_and_explicit():
    request = thought_request(SamplingSpec(n=2, max_tokens=8, temperature=0.7, top_p=0.9), 0, "</think>")
    assert request["temperature"] == 0.7 and request["top_p"] == 0.9
    assert request["top_k"] == 0 and request["min_p"] == 0.0  # vLLM: top_k 0 (or -1) disables it
    assert request["repetition_penalty"] == 1.0
    assert request["presence_penalty"] == 0.0 and request["frequency_penalty"] == 0.0


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_every_field_the_server_would_default_is_sent_as_vllm_s_own_default():
    """vLLM's /v1/completions fills each of these, when the request leaves it unset, from the
    server's defaults, i.e. the model's generation_config.json unless the server was started with
    `--generation-config vllm`. The request sets them all, to what SamplingParams does by default
    (what the in-process engine samples with), apart from temperature and top_p, which follow the spec."""
    from vllm import SamplingParams
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    request = thought_request(SamplingSpec(n=2, max_tokens=8), 0, "</think>")
    neutral = SamplingParams()
    defaulted = CompletionRequest.__private_attributes__["_DEFAULT_SAMPLING_PARAMS"].default  # a pydantic private attr
    assert {"top_k", "min_p", "repetition_penalty"} <= set(defaulted)
    for name in defaulted:
        assert name in request, name
        assert request[name] == getattr(neutral, name), name
    SamplingParams(**request)  # the in-process engine accepts the same fields


def test_a_close_tag_that_is_one_token_stops_by_its_id():
    """vLLM matches stop strings against text that leaves special tokens out, so an added `</think>`
    token would never stop a thought by its text: its id must be a stop id. Tags as text keep the string."""
    added = thought_request(SamplingSpec(n=2, max_tokens=8), 0, "</think>", [49153])
    assert added["stop_token_ids"] == [49153] and added["stop"] == ["</think>"]
    pieces = thought_request(SamplingSpec(n=2, max_tokens=8), 0, "</think>", [9617, 17400, 46])
    assert "stop_token_ids" not in pieces and pieces["stop"] == ["</think>"]


def test_unseeded_requests_carry_no_seed():
    """`rollout.seed_requests=false`: vLLM samples from its engine generator (FlashInfer on GPUs)."""
    assert "seed" not in thought_request(SamplingSpec(n=4, max_tokens=8, seed=3, seeded=False), 0, "</think>")
    assert "seed" in thought_request(SamplingSpec(n=4, max_tokens=8, seed=3), 0, "</think>")
