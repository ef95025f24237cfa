"""Built-in rewards. Each docstring gives the formula and its source; `rntp rewards` lists them.

Notation: y = the H true target tokens, z = the thought, s = sum_h log p(y_h | x, z, y_<h) under
the policy, s0 = the same without a thought under the baseline model (`reward.baseline`:
the current policy, a frozen copy of the initial model, or an EMA teacher), k = `reward.k`.
"""

from __future__ import annotations

import torch

from rewards.registry import RewardInputs, register_reward


@register_reward("target_logprob", "r = s = sum_h log p(y_h | x, z, y_<h)")
def target_logprob(x: RewardInputs) -> torch.Tensor:
    """Summed log-likelihood of the true continuation after the thought: the RNTP default.
    Log-probability of the reference is the robust choice (arXiv 2602.03979)."""
    return x.target_logprobs.sum(-1)


@register_reward("target_logprob_mean", "r = s / H")
def target_logprob_mean(x: RewardInputs) -> torch.Tensor:
    """Per-token mean log-likelihood of the true continuation."""
    return x.target_logprobs.mean(-1)


@register_reward("info_gain", "r = (s - s0) / H, s0 from reward.baseline (policy | initial | ema)")
def info_gain(x: RewardInputs) -> torch.Tensor:
    """Information gain over the no-think baseline, nats per token. RLP (arXiv 2510.01265) uses an
    EMA teacher (decay 0.999) as the baseline. With baseline=policy it is constant in a group, so
    group-normalised advantages equal those of target_logprob_mean."""
    return (x.target_logprobs - x.no_think_logprobs).mean(-1)


def _k(x: RewardInputs) -> int:
    return max(1, min(x.options.k, x.target_ids.shape[1]))


@register_reward("next_token_accuracy", "r = (1/k) sum_{h<k} 1[argmax p(. | x, z, y_<h) = y_h]")
def next_token_accuracy(x: RewardInputs) -> torch.Tensor:
    """Fraction of the first k true tokens that the greedy prediction after the thought gets right."""
    return x.target_greedy[:, : _k(x)].float().mean(-1)


@register_reward("greedy_streak", "r = max m such that argmax predictions match y_1..y_m (tokens)")
def greedy_streak(x: RewardInputs) -> torch.Tensor:
    """Length of the longest correct prefix of greedy predictions: the number of true tokens a
    greedy continuation after the thought reproduces before its first mistake."""
    return x.target_greedy.int().cumprod(-1).sum(-1).float()


def byte_prefix_match(pred: bytes, truth_tokens: list[bytes]) -> float:
    """1 if `pred` is a non-empty byte prefix of the truth that ends on one of its token boundaries."""
    if not pred:
        return 0.0
    truth, boundary = b"", set()
    for t in truth_tokens:
        truth += t
        boundary.add(len(truth))
    return float(truth.startswith(pred) and len(pred) in boundary)


@register_reward("byte_prefix", "r = 1[bytes(argmax after z) is a prefix of bytes(y) ending on a token boundary of y]")
def byte_prefix(x: RewardInputs) -> torch.Tensor:
    """RPT (arXiv 2506.08007): binary reward, 1 if the predicted bytes are an exact prefix of the
    true continuation and end on a token boundary of the true text. The prediction is the greedy
    next token after the thought, compared byte-wise, so a predicted token that spans two true
    tokens counts and one that ends inside a character or a true token does not."""
    out = []
    for pred, target in zip(x.target_pred[:, 0].tolist(), x.target_ids.tolist()):
        out.append(byte_prefix_match(x.token_bytes(pred), [x.token_bytes(t) for t in target]))
    return torch.tensor(out)


def _continuations(x: RewardInputs) -> tuple[list[str], list[str]]:
    return [x.decode(p) for p in x.target_pred.tolist()], [x.decode(t) for t in x.target_ids.tolist()]


@register_reward("bleu", "r = sentenceBLEU(greedy continuation after z, y) / 100 (sacrebleu)")
def bleu(x: RewardInputs) -> torch.Tensor:
    """Overlap of the teacher-forced greedy continuation with the truth by sentence BLEU (effective
    order, so short targets are not zeroed by missing 4-grams), scaled to [0, 1]."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(effective_order=True)
    hyps, refs = _continuations(x)
    return torch.tensor([metric.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)])


@register_reward("chrf", "r = chrF(greedy continuation after z, y) / 100 (sacrebleu)")
def chrf(x: RewardInputs) -> torch.Tensor:
    """Character n-gram F-score of the teacher-forced greedy continuation against the truth."""
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    hyps, refs = _continuations(x)
    return torch.tensor([metric.sentence_score(h, [r]).score / 100 for h, r in zip(hyps, refs)])


@register_reward("confidence", "r = (1/k) sum_{h<k} 1[argmax = y_h] * p(y_h | x, z, y_<h)")
def confidence(x: RewardInputs) -> torch.Tensor:
    """Confidence-aware correctness: a right greedy prediction earns the probability the model gave
    it, so confident right answers beat lucky ones and wrong ones earn nothing."""
    k = _k(x)
    return (x.target_greedy[:, :k].float() * x.target_logprobs[:, :k].exp()).mean(-1)


@register_reward("vrcli", "I = 1 - PPL(y | x, z) / PPL(y | x) = 1 - exp((s0 - s)/H); r = stepped(I)")
def vrcli(x: RewardInputs) -> torch.Tensor:
    """Thresholded relative perplexity improvement, after VR-CLI (arXiv 2503.22828), which scores a
    reasoning trace by how much it lowers a frozen model's perplexity of the reference and maps the
    improvement to a few reward levels. Use with reward.baseline=initial. The steps are
    `reward.vrcli_thresholds` -> `reward.vrcli_values` (ours by default, not the paper's)."""
    thresholds, values = x.options.vrcli_thresholds, x.options.vrcli_values
    horizon = x.target_ids.shape[1]
    improvement = 1 - torch.exp((x.no_think_logprobs.sum(-1) - x.target_logprobs.sum(-1)) / horizon)
    reward = torch.zeros_like(improvement)
    for threshold, value in zip(thresholds, values):
        reward = torch.where(improvement >= threshold, torch.full_like(reward, value), reward)
    return torch.where(torch.isnan(improvement), improvement, reward)


def token_bytes_fn(tokenizer):
    """Bytes of one token id, exact for byte-level BPE vocabularies (every byte is one character
    of the token string); other tokenizers fall back to decoding the token alone."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return lambda i: tokenizer.decode([i]).encode("utf-8")
    # The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes are
    # shifted to code points from 256 upwards, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in char_to_byte.values()]
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(shifted)})
    specials = set(tokenizer.all_special_ids)
    cache: dict[int, bytes] = {}

    def token_bytes(i: int) -> bytes:
        if i not in cache:
            piece = tokenizer.convert_ids_to_tokens(i)
            cache[i] = b"" if i in specials or piece is None else bytes(char_to_byte.get(c, 0) for c in piece)
        return cache[i]

    return token_bytes

