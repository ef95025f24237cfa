"""`thought_request`, the sampling fields both vLLM samplers send: seeds that never repeat within a
call."""

import pytest

from rollout.base import SamplingSpec, thought_request

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
