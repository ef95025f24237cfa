"""Think spans on token ids: cut after the close tag, close what ran out of budget, never re-tokenize."""

import pytest
import torch

from rntp.forward.scoring import build_batch
from rollout import Rollout, ThinkTags

pytestmark = pytest.mark.unit


@pytest.fixture
def tags(tokenizer):
    return ThinkTags(tokenizer)


def test_closed_thought_is_cut_after_the_closing_token(tags, tokenizer):
    sampled = tokenizer.encode("let me see</think> and more text after", add_special_tokens=False)
    r = tags.finish(0, [1, 2], sampled)
    assert r.closed
    assert r.n_sampled == len(r.thought_ids)
    assert tokenizer.decode(r.thought_ids).endswith("</think>")
    assert r.thought_ids == sampled[: len(r.thought_ids)]  # the policy's own ids, unchanged
    assert "</think>" not in tokenizer.decode(r.thought_ids[:-1])


def test_close_tag_merged_into_a_token(tags, tokenizer):
    """A token that carries text past the tag (here '>.' style merges) is kept whole."""
    sampled = tokenizer.encode("done</think>.\nNext", add_special_tokens=False)
    end = tags.close_end(sampled)
    assert end is not None and "</think>" in tokenizer.decode(sampled[:end])
    assert "</think>" not in tokenizer.decode(sampled[: end - 1])


def test_unclosed_thought_gets_canonical_close_without_gradient(tags, tokenizer):
    sampled = tokenizer.encode("thinking about it for a long while", add_special_tokens=False)
    r = tags.finish(3, [5], sampled)
    assert not r.closed and r.group == 3
    assert r.thought_ids == sampled + tags.close_ids
    assert r.n_sampled == len(sampled)


def test_empty_thought(tags):
    r = tags.finish(0, [7], [])
    assert r.thought_ids == tags.close_ids and r.n_sampled == 0 and not r.closed


def test_sequences_are_token_exact_where_retokenizing_would_drift(tags, tokenizer):
    """Context ending in '<' merges with the tag under BPE when re-encoded; we never re-encode."""
    context = tokenizer.encode("if a <", add_special_tokens=False)
    thought = tokenizer.encode(" b then</think>", add_special_tokens=False)
    target = tokenizer.encode(" c:", add_special_tokens=False)
    r = tags.finish(0, tags.prompt(context), thought)
    batch = build_batch([r], [target], pad_id=0)
    ids = batch.input_ids[0].tolist()
    assert ids == context + tags.open_ids + r.thought_ids + target
    retokenized = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
    assert retokenized != ids  # the drift that token-exact sequences avoid


def test_masks_cover_exactly_the_sampled_thought_and_the_target(tags):
    r_closed = Rollout(0, [10, 11, 12], [20, 21, 22], n_sampled=3, closed=True)
    r_open = Rollout(0, [10, 11, 12, 13], [30] + [90, 91], n_sampled=1, closed=False)
    batch = build_batch([r_closed, r_open], [[40, 41], [50, 51]], pad_id=0)
    ids = batch.input_ids
    # Predicted token at shifted index t is ids[:, t+1].
    assert ids[0, 1:][batch.thought_mask[0]].tolist() == [20, 21, 22]
    assert ids[0, 1:][batch.target_mask[0]].tolist() == [40, 41]
    assert ids[1, 1:][batch.thought_mask[1]].tolist() == [30]  # the appended close gets no gradient
    assert ids[1, 1:][batch.target_mask[1]].tolist() == [50, 51]
    assert batch.attention_mask.sum(1).tolist() == [8, 9]
    assert not (batch.thought_mask & batch.target_mask).any()
    assert batch.thought_mask.dtype == torch.bool
