"""Downstream tasks through lm-evaluation-harness (lm-eval 0.4.13): a checkpoint (a Hugging Face folder)
through lm-eval's HF model, plainly or thinking first, results beside the held-out report.

What thinking does here (`think=on`), exactly:
- For every distinct context lm-eval sends (a question with its few-shot examples, as token ids), the
  model writes one thought the way training samples them: `<think>` appended to the context, up to
  `max_thought_tokens` tokens sampled at `temperature` until the text holds `</think>` (a thought that
  reaches the budget gets `</think>` appended), once, seeded, kept for the whole evaluation.
- loglikelihood requests (multiple choice): each continuation (answer choice) is scored after
  context + thought. The thought's own tokens are not scored, and every choice of a context is scored
  after the same thought: the model thinks before it sees any choice.
- generate_until requests: the answer is generated after context + thought with the task's own
  settings (stop strings, length, greedy unless the task samples); only the text after `</think>` is
  the answer lm-eval grades.
- loglikelihood_rolling requests (perplexity over whole documents) are refused: such a score has no
  one place where a thought would go.
`think=off` is lm-eval's own HF model, unchanged; `both` runs off then on with the same loaded model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from rntp import console
from rntp.config import Config

log = logging.getLogger(__name__)

HOW = __doc__.split("What thinking does here (`think=on`), exactly:\n", 1)[1].strip()


def thinking_lm_class():
    """The lm-eval model class (built on first use: lm-eval is imported only when asked for)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    from rollout import SamplingSpec, ThinkTags
    from rollout.hf_sampler import HFSampler

    class ThinkingHFLM(HFLM):
        """lm-eval's HFLM; with `think` on, the model writes an RNTP thought after each context first."""

        def __init__(self, pretrained: str, *, think: bool = False, open_tag: str = "<think>",
                     close_tag: str = "</think>", max_thought_tokens: int = 32, temperature: float = 1.0,
                     seed: int = 0, thought_batch: int = 16, **kwargs):
            super().__init__(pretrained=pretrained, **kwargs)
            self.think = think
            self.tags = ThinkTags(self.tokenizer, open_tag, close_tag)
            self.sampler = HFSampler(self.model, self.tags, batch_prompts=thought_batch)
            self.spec = SamplingSpec(1, max_thought_tokens, temperature, 1.0, seed)
            self.thought_batch = thought_batch
            self.thoughts: dict[tuple[int, ...], object] = {}  # context ids -> its Rollout
            self._batches = 0

        # -- thoughts ---------------------------------------------------------------------------------
        def thought_ids(self, contexts: list[list[int]]) -> list[list[int]]:
            """OPEN + thought + CLOSE for each context, sampled once per distinct context, in batches
            (each seeded by the run's seed and the batch's number: the same tasks in the same order
            give the same thoughts)."""
            new = list(dict.fromkeys(tuple(c) for c in contexts if tuple(c) not in self.thoughts))
            for start in range(0, len(new), self.thought_batch):
                chunk = new[start : start + self.thought_batch]
                spec = replace(self.spec, seed=self.spec.seed * 100_003 + self._batches)
                self._batches += 1
                for c, r in zip(chunk, self.sampler.sample([self.tags.prompt(list(c)) for c in chunk], spec)):
                    self.thoughts[c] = r
            return [self.tags.open_ids + self.thoughts[tuple(c)].thought_ids for c in contexts]

        def thought_stats(self, tokenizer, examples: int = 3) -> dict:
            rolls = list(self.thoughts.items())
            if not rolls:
                return {"count": 0}
            return {"count": len(rolls), "mean_tokens": sum(r.n_sampled for _, r in rolls) / len(rolls),
                    "closed_frac": sum(r.closed for _, r in rolls) / len(rolls),
                    "examples": [{"context_tail": tokenizer.decode(list(c)[-48:]),
                                  "thought": tokenizer.decode(r.thought_ids)} for c, r in rolls[:examples]]}

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """lm-eval's own tokenization of a request (LM.loglikelihood's, empty contexts included)."""
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                return ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            return self._encode_pair(context, continuation)

        # -- the three request types ---------------------------------------------------------------------
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            if not self.think:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            args = [req.args for req in requests]
            pairs = [self._pair(context, continuation) for context, continuation in args]
            suffixes = self.thought_ids([c for c, _ in pairs])
            return self._loglikelihood_tokens([(a, c + s, k) for a, (c, k), s in zip(args, pairs, suffixes)],
                                              disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            if self.think:
                tasks = sorted({req.task_name for req in requests if getattr(req, "task_name", None)})
                raise ValueError(f"think=on: loglikelihood_rolling tasks ({', '.join(tasks) or 'perplexity'}) score "
                                 "every token of a document, so a thought has no one place to go; run them with "
                                 "think=off")
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not self.think:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            args = [req.args for req in requests]
            contexts = [self.tok_encode(context) for context, _ in args]
            suffixes = self.thought_ids(contexts)
            eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
            out = []
            for (context, gen_kwargs), ids, suffix in zip(args, contexts, suffixes):
                kwargs = dict(normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks))
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                full = (ids + suffix)[-(self.max_length - max_gen):]  # left-truncated as lm-eval does
                prompt = torch.tensor([full], device=self.device)
                cont = self._model_generate(context=prompt, attention_mask=torch.ones_like(prompt), stop=until,
                                            max_length=len(full) + max_gen, **kwargs)
                text = postprocess_generated_text(self.tok_decode(cont[0, len(full):].tolist()), until, None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

    return ThinkingHFLM


def sample_record(lm, sample: dict, thinking: bool) -> dict:
    """One document as lm-eval logged it, with the thought written before its answers (ids and text)."""
    out = {k: sample[k] for k in ("doc_id", "arguments", "resps", "target") if k in sample}
    if thinking:
        context, second = sample["arguments"][0][0], sample["arguments"][0][1]
        ids = lm.tok_encode(context) if isinstance(second, dict) else lm._pair(context, second)[0]
        rollout = lm.thoughts.get(tuple(ids))
        if rollout is not None:
            out.update({"thought_ids": rollout.thought_ids, "thought": lm.tokenizer.decode(rollout.thought_ids),
                        "thought_closed": rollout.closed})
    return out


def think_settings(cfg: Config) -> dict:
    """The thought a model writes before answering, from the run's config (as the held-out evaluation)."""
    return {"open_tag": cfg.rollout.open_tag, "close_tag": cfg.rollout.close_tag,
            "max_thought_tokens": cfg.eval.max_thought_tokens or cfg.rollout.max_thought_tokens,
            "temperature": cfg.eval.temperature, "seed": cfg.eval.seed}


def models_to_run(paths: list[str]) -> list[dict]:
    """A run folder gives its base model and its last checkpoint; any other path is evaluated as given."""
    from rntp.experiments.evaluate import discover

    out = []
    for path in paths:
        found = discover([path])
        out += found if len(found) <= 2 else [found[0], found[-1]]
    return out


def run_lm_eval(model_paths: list[str], cfg: Config, out_dir: Path, tasks: list[str], *, include: str | None = None,
                think: str = "off", limit: float | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, device: str | None = None) -> dict:
    """lm-eval on each model (think off, on, or both); lm_eval.json and lm_eval.md in `out_dir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if think not in ("off", "on", "both"):
        raise ValueError(f"think={think!r}: choose off, on or both")
    models = models_to_run(model_paths)  # every path checked before a model loads
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # lm-eval's own tasks too (slower)
        manager = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}" + (f" (searched {include} and lm-eval's own)"
                                                                            if include else ""))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = think_settings(cfg)
    modes = {"off": [False], "on": [True], "both": [False, True]}[think]
    results = []
    for entry in models:
        lm = thinking_lm_class()(entry["path"], device=device, dtype=cfg.model.dtype, batch_size=batch_size,
                                 trust_remote_code=cfg.model.trust_remote_code, **settings)
        for on in modes:
            lm.think = on
            got = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=1000,
                                          random_seed=cfg.eval.seed)
            results.append({"label": entry["label"], "step": entry["step"], "path": str(entry["path"]), "think": on,
                            "results": got["results"], "n-samples": got.get("n-samples"),
                            "thoughts": lm.thought_stats(lm.tokenizer) if on else None,
                            "samples": {t: [sample_record(lm, s, on) for s in rows]
                                        for t, rows in got.get("samples", {}).items()}})
            console.say(f"{entry['label']} (think {'on' if on else 'off'}): {got['results']}")
        del lm
    report = {"schema": "rntp.lm_eval/1", "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__")
              else "0.4.13", "tasks": list(tasks), "include": include, "limit": limit, "num_fewshot": num_fewshot,
              "think": {**settings, "how": HOW}, "results": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lm_eval.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "lm_eval.md").write_text(lm_eval_markdown(report))
    return report


def metric_rows(result: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of one lm-eval result, numbers only."""
    rows = []
    for task, metrics in result["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            rows.append((task, metric if flt == "none" else f"{metric} ({flt})", float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def lm_eval_markdown(report: dict) -> str:
    s = report["think"]
    lines = [f"# Downstream tasks (lm-eval {report['lm_eval_version']})", "",
             f"Tasks: {', '.join(report['tasks'])}; limit {report['limit']}; few-shot {report['num_fewshot']}. "
             f"Thinking on: `{s['open_tag']}` + up to {s['max_thought_tokens']} tokens at temperature "
             f"{s['temperature']} (seed {s['seed']}) until `{s['close_tag']}`, one thought per context, the thought "
             "unscored and shared by all its choices; off: lm-eval's HF model unchanged.", "",
             "| model | step | thinking | task | metric | value | stderr | thought tokens | closed |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        t = r["thoughts"] or {}
        thought = f"{t['mean_tokens']:.1f} | {t['closed_frac']:.2f}" if t.get("count") else " | "
        step = "" if r["step"] is None else r["step"]
        for task, metric, value, stderr in metric_rows(r):
            err = "" if stderr is None else f"{stderr:.4f}"
            lines.append(f"| {r['label']} | {step} | {'on' if r['think'] else 'off'} | {task} | {metric} | "
                         f"{value:.4f} | {err} | {thought} |")
    pairs = {}
    for r in report["results"]:
        for task, metric, value, _ in metric_rows(r):
            pairs.setdefault((r["label"], task, metric), {})[r["think"]] = value
    both = [(k, v) for k, v in pairs.items() if len(v) == 2]
    if both:
        lines += ["", "Thinking minus not thinking (same model, tasks and documents):", "",
                  "| model | task | metric | on − off |", "|---|---|---|---:|"]
        lines += [f"| {label} | {task} | {metric} | {v[True] - v[False]:+.4f} |" for (label, task, metric), v in both]
    return "\n".join(lines) + "\n"
