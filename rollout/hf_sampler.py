"""Fallback sampler: transformers `generate` on the training model itself (no weight copy)."""

from __future__ import annotations

import torch

from rollout.base import SamplingSpec
from rollout.spans import Rollout, ThinkTags, left_pad, pad_id_of


class HFSampler:
    def __init__(self, model, tags: ThinkTags, batch_prompts: int = 16):
        self.model, self.tags, self.batch_prompts = model, tags, batch_prompts
        self.pad_id = pad_id_of(tags.tokenizer)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Rollout]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rollouts: list[Rollout] = []
        for start in range(0, len(prompts), self.batch_prompts):
            batch = prompts[start : start + self.batch_prompts]
            ids, mask = left_pad(batch, self.pad_id)  # every prompt ends at the same column
            width = ids.shape[1]
            # Seeded per chunk of prompts from the spec: same weights, same thoughts. `generate` draws
            # from the global generator only, so seed it inside fork_rng: the caller's stream is restored.
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(spec.seed * 1_000_003 + start)
                out = self.model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                    max_new_tokens=spec.max_tokens, num_return_sequences=spec.n,
                    # Like vLLM's ignore_eos: a thought ends only at the close tag or the budget.
                    eos_token_id=None, stop_strings=[self.tags.close_tag], tokenizer=self.tags.tokenizer,
                    pad_token_id=self.pad_id, return_dict_in_generate=True, output_scores=True,
                )
            new = out.sequences[:, width:]
            # `scores` are the logits after temperature and top-p, as sampled from: the behaviour log-probs
            behaviour = torch.stack([torch.log_softmax(step.float(), -1).gather(-1, new[:, t : t + 1])[:, 0]
                                     for t, step in enumerate(out.scores)], 1)
            for j, (sampled, logp) in enumerate(zip(new.tolist(), behaviour.tolist())):
                group = start + j // spec.n
                rollouts.append(self.tags.finish(group, prompts[group], sampled, logp))
        self.model.train(was_training)
        return rollouts

    def push_weights(self, weights) -> None:
        """A no-op when sampling from the training model itself; a separate copy (used when the
        trained weights are sharded) takes the gathered tensors."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in (item for bucket in weights for item in bucket):
                target = params.get(name)
                if target is not None and target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor.to(target.device, target.dtype))

    def sleep(self) -> None:
        pass  # it is the training model

    def close(self) -> None:
        pass
