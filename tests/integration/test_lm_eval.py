"""`rntp lm-eval`: lm-evaluation-harness on the tiny model with local task files (no hub), plainly and
thinking first, each score checked against plain transformers forwards and greedy generation."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.integration

QUESTIONS = ["The value returned by the function is a", "Each line of the file holds one", "A list of names and a",
             "The default argument of the method is the"]
CHOICES = ["list", "string", "number"]


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice task, a generation task and a perplexity task, each a YAML over a local JSONL."""
    d = tmp_path / "tasks"
    d.mkdir()
    with open(d / "qa.jsonl", "w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"question": q, "choices": CHOICES, "label": i % 3, "answer": CHOICES[i % 3],
                                "text": q + " " + CHOICES[i % 3] + "."}) + "\n")
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(d / "qa.jsonl")}},
              "test_split": "test"}
    tasks = {
        "rntp_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
        "rntp_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
                     "metric_list": [{"metric": "exact_match"}]},
        "rntp_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": "word_perplexity"}]},
    }
    for name, spec in tasks.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **spec}, sort_keys=False))
    return d


@pytest.fixture
def config_file(tmp_path, tiny_model_dir):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_model_dir)},
                                    "rollout": {"tag_tokens": "text", "max_thought_tokens": 6},
                                    "eval": {"max_thought_tokens": 5, "seed": 3}}))
    return path


def logprob(model, prefix, continuation):
    ids = torch.tensor([prefix + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(continuation))


def test_lm_eval_plain_and_thinking_match_independent_scores(tmp_path, tiny_model_dir, tokenizer, task_dir,
                                                             config_file):
    from rntp.cli import main

    out = tmp_path / "out"
    assert main(["lm-eval", "--model", str(tiny_model_dir), "--config", str(config_file), "--tasks", "rntp_mc,rntp_gen",
                 "--include", str(task_dir), "--think", "both", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads((out / "lm_eval.json").read_text())
    assert report["schema"] == "rntp.lm_eval/1" and report["think"]["max_thought_tokens"] == 5
    off, on = report["results"]
    assert (off["think"], on["think"]) == (False, True) and off["thoughts"] is None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    open_ids = tokenizer.encode("<think>", add_special_tokens=False)
    close_ids = tokenizer.encode("</think>", add_special_tokens=False)

    def pair(context, continuation):  # lm-eval's causal split: encode the whole, cut at the context's length
        ctx = tokenizer(context).input_ids
        return ctx, tokenizer(context + continuation).input_ids[len(ctx):]

    for result, thinking in ((off, False), (on, True)):
        hits = []
        for s in result["samples"]["rntp_mc"]:
            thought = s.get("thought_ids") if thinking else []
            assert thought is not None  # every document of the thinking run has its thought
            scores = []
            for (context, continuation), resp in zip(s["arguments"], s["resps"]):
                ctx, cont = pair(context, continuation)
                suffix = open_ids + thought if thinking else []  # the thought ends with its close tag
                want = logprob(model, ctx + suffix, cont)
                assert resp[0][0] == pytest.approx(want, abs=2e-4)
                scores.append(want)
            hits.append(float(max(range(3), key=scores.__getitem__) == int(s["target"])))
            if thinking:
                assert thought[-len(close_ids):] == close_ids and len(thought) <= 5 + len(close_ids)
        assert result["results"]["rntp_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    # thinking: one thought per question (its three choices share it), and the answer is greedy after it
    assert on["thoughts"]["count"] == len(QUESTIONS) and 0 <= on["thoughts"]["closed_frac"] <= 1
    for s in on["samples"]["rntp_gen"]:
        (context, kwargs), = s["arguments"]
        prefix = tokenizer(context).input_ids + open_ids + s["thought_ids"]
        with torch.no_grad():
            ids = model.generate(torch.tensor([prefix]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prefix):]
        text = tokenizer.decode(ids).split("\n")[0].split(tokenizer.eos_token)[0]
        assert s["resps"][0][0] == text
    md = (out / "lm_eval.md").read_text()
    assert "| on | rntp_mc | acc |" in md and "| off | rntp_gen | exact_match |" in md
    assert "Thinking minus not thinking" in md


def test_thinking_refuses_perplexity_tasks_and_unknown_tasks_are_named(tmp_path, tiny_model_dir, task_dir):
    from rntp.config import load_config
    from rntp.experiments.downstream import run_lm_eval

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "rollout.tag_tokens=text",
                             "eval.max_thought_tokens=3"])
    with pytest.raises(ValueError, match="think=on: loglikelihood_rolling tasks .* run them with think=off"):
        run_lm_eval([str(tiny_model_dir)], cfg, tmp_path / "o", ["rntp_ppl"], include=str(task_dir), think="on",
                    limit=2)
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_lm_eval([str(tiny_model_dir)], cfg, tmp_path / "o", ["rntp_nope"], include=str(task_dir))
