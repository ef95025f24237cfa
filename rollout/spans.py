"""Think-span formatting on token ids: never decode and re-tokenize what is scored."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's own, else its end-of-sequence id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask, left-padded so that every sequence ends in the last column."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class Rollout:
    """One sampled thought at one position. Sequence = prompt + thought + target ids.

    `thought_ids` ends with the close tag: the policy's own tokens when it closed the thought
    (`closed`), else the canonical close ids appended after the budget ran out. Only the first
    `n_sampled` thought ids were sampled by the policy and carry policy gradient.
    """

    group: int
    prompt_ids: list[int]
    thought_ids: list[int]
    n_sampled: int
    closed: bool
    # log p of each of the n_sampled tokens under the distribution the sampler drew it from (after
    # temperature and top-p, in the sampler's own precision and kernels); None if not reported
    behaviour_logprobs: list[float] | None = None
    # the weights that sampled it: those after this training step (0 = the initial weights)
    policy_version: int | None = None


class ThinkTags:
    """The open/close tags as token ids, and the rule that turns sampled ids into a span."""

    def __init__(self, tokenizer, open_tag: str = "<think>", close_tag: str = "</think>"):
        self.tokenizer = tokenizer
        self.open_tag, self.close_tag = open_tag, close_tag
        self.open_ids = tokenizer.encode(open_tag, add_special_tokens=False)
        self.close_ids = tokenizer.encode(close_tag, add_special_tokens=False)
        if not self.open_ids or not self.close_ids:
            raise ValueError(f"tags {open_tag!r}/{close_tag!r} tokenize to nothing")

    def prompt(self, context_ids: list[int]) -> list[int]:
        return list(context_ids) + self.open_ids

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def close_end(self, sampled: list[int]) -> int | None:
        """Length of the shortest prefix of `sampled` whose text contains the close tag.

        Decoding is used only to find the tag (as vLLM's stop strings do); the ids are kept.
        Containment grows with the prefix, so a binary search needs O(log n) decodes.
        """
        if not sampled or self.close_tag not in self._text(sampled):
            return None
        lo, hi = 1, len(sampled)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.close_tag in self._text(sampled[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def finish(self, group: int, prompt_ids: list[int], sampled: list[int],
               logprobs: list[float] | None = None) -> Rollout:
        """Cut the sampled ids (and their behaviour log-probs) after the close tag, or close a thought
        that ran out of budget."""
        end = self.close_end(sampled)
        closed = end is not None
        end = end if closed else len(sampled)
        kept = list(sampled[:end])
        behaviour = [float(x) for x in logprobs[:end]] if logprobs is not None else None
        return Rollout(group, list(prompt_ids), kept if closed else kept + self.close_ids, n_sampled=len(kept),
                       closed=closed, behaviour_logprobs=behaviour)
