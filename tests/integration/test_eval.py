"""Held-out evaluation: independent NLL, bits per byte on multi-byte text, determinism, reports."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rntp.experiments.evaluate import build_eval_set, evaluate_policy, run_eval, token_byte_lengths
from rntp.train import train
from rollout import ThinkTags, make_sampler

pytestmark = pytest.mark.integration


def eval_config(tiny_config, *extra):
    return tiny_config("eval.num_positions=6", "eval.thoughts=3", "eval.batch_positions=4", "eval.samples=2",
                       *extra)


def test_no_think_nll_equals_transformers_loss_and_bpb_follows(tiny_config, tiny_model_dir, tokenizer):
    cfg = eval_config(tiny_config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    evalset = build_eval_set(cfg, tokenizer, model)
    sampler = make_sampler("hf", str(tiny_model_dir), ThinkTags(tokenizer), policy=model)
    m = evaluate_policy(model, sampler, ThinkTags(tokenizer), evalset, cfg, progress=False)["metrics"]
    losses = []
    for p in evalset.positions:
        ids = torch.tensor([p.context + p.target])
        labels = torch.tensor([[-100] * len(p.context) + p.target])
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=labels).loss))  # mean over the H target tokens
    assert len(losses) == 6
    assert m["nll_no_think"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    total_bytes = sum(len(tokenizer.decode(p.target).encode("utf-8")) for p in evalset.positions)
    nats = m["nll_no_think"] * cfg.data.horizon * len(losses)
    assert m["bpb_no_think"] == pytest.approx(nats / math.log(2) / total_bytes, rel=1e-6)
    # k thoughts: the marginal lies between the mean and the best (Jensen, and max >= mean)
    assert m["nll_think_best"] <= m["nll_think_marginal"] + 1e-9 <= m["nll_think_mean"] + 2e-9
    assert m["info_gain"] == pytest.approx(m["nll_no_think"] - m["nll_think_mean"])
    assert sum(m[f"positions/{b}"] for b in ("easy", "medium", "hard")) == 6
    assert m["info_gain/easy"] is None or m["nll_no_think/easy"] > 0  # every metric by bucket, not only the gain
    assert 0 <= m["acc_no_think"] <= 1 and 0 <= m["truncated_frac"] <= 1


def test_kept_samples_are_one_thought_from_each_of_the_first_positions(tiny_config, tiny_model_dir, tokenizer):
    """Thoughts kept for reading show different positions (not all k thoughts of one position, which read
    as one example repeated once thoughts agree)."""
    cfg = eval_config(tiny_config, "eval.samples=3")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    evalset = build_eval_set(cfg, tokenizer, model)
    sampler = make_sampler("hf", str(tiny_model_dir), ThinkTags(tokenizer), policy=model)
    samples = evaluate_policy(model, sampler, ThinkTags(tokenizer), evalset, cfg, progress=False)["samples"]
    expected = [(tokenizer.decode(p.context[-64:]), tokenizer.decode(p.target)) for p in evalset.positions[:3]]
    assert [(s["context_tail"], s["target"]) for s in samples] == expected


def test_token_bytes_are_exact_on_multibyte_text(tokenizer):
    text = "naïve café — 東京の空 🙂 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths = token_byte_lengths(tokenizer, ids)
    assert sum(lengths) == len(text.encode("utf-8"))
    # some token holds part of a character: decoding it alone cannot give its bytes
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_same_checkpoint_data_and_seed_give_the_same_numbers(tiny_config, tiny_model_dir, tmp_path):
    cfg = eval_config(tiny_config)
    a = run_eval([str(tiny_model_dir)], cfg, tmp_path / "a", sampler_kind="hf")
    b = run_eval([str(tiny_model_dir)], cfg, tmp_path / "b", sampler_kind="hf")
    assert a["results"][0]["metrics"] == b["results"][0]["metrics"]
    assert a["results"][0]["samples"] == b["results"][0]["samples"]


def test_run_folder_evaluates_base_and_every_checkpoint_with_reports(tiny_config, tmp_path, capsys):
    train(tiny_config("train.steps=2", "train.save_every=1"))
    cfg = eval_config(tiny_config)
    capsys.readouterr()
    report = run_eval([str(tmp_path / "run")], cfg, tmp_path / "eval", sampler_kind="hf")
    # the per-bucket rows: on the terminal, in eval.md and eval.csv, with how the buckets were cut
    printed = capsys.readouterr().out
    assert "By difficulty (the starting model's next-token entropy at each position; easy below 1.00" in printed
    assert sum(line.startswith("| step_000002 | 2 | ") for line in printed.splitlines()) == 3
    assert report["buckets"] == {"by": "entropy", "how": "fixed", "easy_below": 1.0, "hard_above": 3.0}
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert all(f"| step_000001 | 1 | {b} | " in md for b in ("easy", "medium", "hard"))
    assert "nll_no_think/hard" in (tmp_path / "eval" / "eval.csv").read_text().splitlines()[0]
    assert [r["step"] for r in report["results"]] == [0, 1, 2]
    assert report["schema"] == "rntp.eval/1" and report["positions"] == 6
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk["results"][2]["metrics"] == report["results"][2]["metrics"]
    per = on_disk["results"][2]["per_position"]  # the values at each position, whose means are the metrics
    assert len(per["keys"]) == 6 and per["keys"] == on_disk["results"][0]["per_position"]["keys"]
    for name, values in per["values"].items():
        assert sum(values) / 6 == pytest.approx(on_disk["results"][2]["metrics"][name], rel=1e-6, abs=1e-9), name
    for name in ("eval.md", "eval.html", "eval.csv", "eval.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "| step_000002 | 2 |" in (tmp_path / "eval" / "eval.md").read_text()
    # training moved the model, so the same positions score differently
    assert report["results"][0]["metrics"]["nll_no_think"] != report["results"][2]["metrics"]["nll_no_think"]


def test_periodic_eval_during_training(tiny_config, tmp_path):
    """Every `eval.every` steps, the last step, and step 0 (the base model, before any update)."""
    train(eval_config(tiny_config, "train.steps=3", "eval.every=2"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "eval/nll_no_think" in r] == [0, 2, 3]
    assert "info_gain" not in rows[0] and rows[2]["eval/nll_no_think"] > 0 and rows[2]["time/eval"] > 0
    # the empty-thought split of the gain adds up
    m = {k[len("eval/"):]: v for k, v in rows[2].items() if k.startswith("eval/")}
    assert m["info_gain_empty"] + m["info_gain_content"] == pytest.approx(m["info_gain"], abs=1e-9)
    assert (tmp_path / "run" / "heldout.md").read_text().count("\n| ") >= 3
    # every evaluation's values at each position, for rntp compare: their means are the logged metrics
    from rntp.experiments.evaluate import PER_POSITION

    saved = [json.loads(line) for line in open(tmp_path / "run" / "eval_positions.jsonl")]
    assert [r["step"] for r in saved] == [0, 2, 3]
    logged = {r["step"]: r for r in rows}
    for r in saved:
        assert r["keys"] == saved[0]["keys"] and len(set(r["keys"])) == 6  # the same 6 positions each time
        for name in PER_POSITION:
            assert len(r["values"][name]) == 6
            mean = sum(r["values"][name]) / 6
            assert mean == pytest.approx(logged[r["step"]][f"eval/{name}"], rel=1e-6, abs=1e-9), name
    from rntp.experiments.compare import compare

    compare([str(tmp_path / "run")], tmp_path / "cmp", resamples=100)
    assert "| run | 1 | 6 | 3 |" in (tmp_path / "cmp" / "compare.md").read_text()  # one seed, 6 positions


def test_the_empty_thought_score_is_the_target_after_the_tags_alone(tiny_config, tiny_model_dir, tokenizer):
    cfg = eval_config(tiny_config)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tags = ThinkTags(tokenizer)
    evalset = build_eval_set(cfg, tokenizer, model)
    sampler = make_sampler("hf", str(tiny_model_dir), tags, policy=model)
    m = evaluate_policy(model, sampler, tags, evalset, cfg, progress=False)["metrics"]
    nll = []
    for p in evalset.positions:  # [context] <think> </think> [target], one unpadded forward each
        prefix = p.context + tags.open_ids + tags.close_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + p.target])).logits[0].double(), -1)
        nll += [-float(logp[len(prefix) + h - 1, t]) for h, t in enumerate(p.target)]
    assert m["nll_empty_thought"] == pytest.approx(sum(nll) / len(nll), abs=1e-4)
    assert m["info_gain_empty"] == pytest.approx(m["nll_no_think"] - m["nll_empty_thought"], abs=1e-9)


def test_bad_eval_input_is_a_clear_error(tiny_config, tmp_path):
    cfg = eval_config(tiny_config)
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no weights"):
        run_eval([str(tmp_path / "no-weights")], cfg, tmp_path / "out", sampler_kind="hf")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no documents could be read"):
        run_eval([str(cfg.model.name_or_path)], eval_config(tiny_config, f"eval.data={empty}"), tmp_path / "out",
                 sampler_kind="hf")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "a few words only"}) + "\n")
    with pytest.raises(ValueError, match="no usable positions.*short_docs"):
        run_eval([str(cfg.model.name_or_path)], eval_config(tiny_config, f"eval.data={short}"), tmp_path / "out",
                 sampler_kind="hf")


def test_buckets_add_back_up_and_logprob_difficulty_is_the_true_tokens_nll(tiny_config, tiny_model_dir, tokenizer):
    """Terciles of the base model's -log p(true next token): each bucket holds 2 of the 6 positions, the
    difficulty is an independent forward's NLL of the first target token, and every per-bucket metric,
    weighted by its positions, adds back up to the overall one (a float64 loop over the saved values)."""
    from rntp.experiments.evaluate import BUCKETED, BUCKETS

    cfg = eval_config(tiny_config, "eval.bucket_by=logprob", "eval.buckets=terciles")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    evalset = build_eval_set(cfg, tokenizer, model)
    for p, d in zip(evalset.positions, evalset.difficulty.tolist()):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p.context])).logits[0, -1].double()
        assert d == pytest.approx(-float(torch.log_softmax(logits, -1)[p.target[0]]), abs=1e-4)
    assert sorted(evalset.buckets) == ["easy"] * 2 + ["hard"] * 2 + ["medium"] * 2
    sampler = make_sampler("hf", str(tiny_model_dir), ThinkTags(tokenizer), policy=model)
    result = evaluate_policy(model, sampler, ThinkTags(tokenizer), evalset, cfg, progress=False)
    m, per = result["metrics"], result["per_position"]
    assert per["buckets"] == evalset.buckets and per["difficulty"] == evalset.difficulty.tolist()
    assert (m["bucket_easy_below"], m["bucket_hard_above"]) == evalset.thresholds
    for name in BUCKETED:
        total = 0.0
        for b in BUCKETS:
            inside = [v for v, label in zip(per["values"][name], per["buckets"]) if label == b]
            assert m[f"positions/{b}"] == len(inside) == 2
            assert m[f"{name}/{b}"] == pytest.approx(math.fsum(inside) / 2, abs=1e-9), (name, b)
            total += m[f"positions/{b}"] * m[f"{name}/{b}"]
        assert total / 6 == pytest.approx(m[name], abs=1e-9), name
