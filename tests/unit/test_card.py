"""Model cards (`rntp.card`) from run folders written by hand: the Hub's parser reads the front matter
(base model, library, tags, datasets, license carried from the base's card), LoRA adapters say so and
name their base, and the held-out table comes by difficulty bucket."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard, metadata_load

from rntp.card import write_card
from rntp.config import load_config

pytestmark = pytest.mark.unit


def fake_run(tmp_path, *overrides):
    """A run folder with a config, two training steps, held-out evaluations at steps 0 and 2 and a step-2
    checkpoint (its config only: the card reads no weights)."""
    run = tmp_path / "my-run"
    ckpt = run / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    cfg = load_config(None, [f"run_dir={run}", "rollout.group_size=4", "train.positions_per_step=2",
                             "data.horizon=8", *overrides])
    (ckpt / "rntp_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    rows = []
    for step, gain in ((0, -1.9), (2, -1.1)):
        row = {"step": step, "eval/info_gain": gain, "eval/nll_no_think": 3.0, "eval/bucket_easy_below": 1.0,
               "eval/bucket_hard_above": 3.0}
        for b, n in (("easy", 5), ("medium", 19), ("hard", 40)):
            row.update({f"eval/positions/{b}": n, f"eval/info_gain/{b}": gain + 0.1})
        if step:
            row["thought/len_mean"] = 10.0
        rows.append(row)
    rows.insert(1, {"step": 1, "thought/len_mean": 12.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt


def test_a_checkpoint_card_parses_and_says_what_and_how(tmp_path):
    ckpt = fake_run(tmp_path, "data.source=HuggingFaceFW/fineweb-edu", "data.subset=sample-10BT")
    path = write_card(ckpt, ckpt, adapter=False)
    meta = metadata_load(path)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the offline default's hub name
    assert meta["library_name"] == "transformers" and "rntp" in meta["tags"] and "lora" not in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    card = ModelCard.load(path)  # the Hub's own card parser
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = card.text
    assert "all weights trained" in text and "| `reward.name` | target_logprob |" in text
    # 2 training steps x 2 positions x 4 thoughts; thought tokens (12 + 10) x 4 x 2; 16 thoughts x 8 targets
    assert "Trained for 2 steps (2 in all): 4 positions, 16 thoughts, about 176 sampled thought tokens and 128" \
        in text
    assert "| hard | 40 | -1.800 → -1.000 |" in text and "RNTP commit `" in text
    assert "stop=['</think>']" in text and "- torch " in text and "- transformers " in text


def test_local_data_is_no_dataset_and_a_local_base_carries_its_license(tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n")
    ckpt = fake_run(tmp_path, f"model.name_or_path={base}", f"data.source={tmp_path / 'docs.jsonl'}")
    meta = metadata_load(write_card(ckpt, ckpt, adapter=False))
    assert meta["license"] == "apache-2.0"
    assert "datasets" not in meta and "base_model" not in meta  # a local folder is no Hub repository


def test_a_lora_checkpoint_says_so_and_names_its_base(tmp_path):
    ckpt = fake_run(tmp_path, "model.lora.enabled=true", "model.lora.rank=8")
    meta = metadata_load(write_card(ckpt, ckpt, adapter=True))
    assert meta["library_name"] == "peft" and {"lora", "peft"} <= set(meta["tags"])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = (ckpt / "README.md").read_text()
    assert "A **LoRA adapter** (rank 8, alpha 32.0) for the base model `smollm2-135m`" in text
    merged = write_card(tmp_path, ckpt, adapter=False, merged=True)
    assert metadata_load(merged)["library_name"] == "transformers"
    assert "**LoRA adapter** (rank 8) merged into its weights" in merged.read_text()


def test_a_run_that_never_evaluated_says_so(tmp_path):
    ckpt = fake_run(tmp_path)
    (ckpt.parent.parent / "metrics.jsonl").write_text(json.dumps({"step": 1, "thought/len_mean": 3.0}) + "\n")
    text = write_card(ckpt, ckpt, adapter=False).read_text()
    assert "The run logged no held-out evaluation" in text and "Trained for 1 step (" in text
