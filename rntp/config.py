"""Typed, validated run configuration.

A run is described by one YAML file plus `key.sub=value` overrides. Every section
forbids unknown keys, so a typo is a clear error before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 (`train.steps=true` ran one step) and 1 as true.
        wants_bool = cls.model_fields[info.field_name].annotation in (bool, "bool")
        if isinstance(value, bool) and not wants_bool:
            raise ValueError(f"got the boolean {str(value).lower()}, which is not a valid value here")
        if wants_bool and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value


class ModelConfig(Section):
    # A local Hugging Face folder, a hub name (where the network allows), or the alias
    # "smollm2-135m" for the offline default that `rntp prepare-model` provisions.
    name_or_path: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Autocast the training forward to bfloat16 while keeping float32 master weights.
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


class DataConfig(Section):
    # "stdlib-docs" (the offline default corpus), a .txt/.jsonl/.parquet file or folder of
    # them, a `datasets.save_to_disk` folder, or a hub dataset name.
    source: str = "stdlib-docs"
    split: str = "train"
    subset: str | None = Field(None, description="a hub dataset's configuration name, e.g. sample-10BT")
    text_column: str = "text"
    streaming: bool = False
    shuffle: bool = True
    shuffle_buffer: int = Field(1000, ge=1)
    chunk_tokens: int = Field(256, ge=8)
    positions_per_chunk: int = Field(1, ge=1)
    # uniform: any position in bounds. entropy: only positions whose next-token entropy under the
    # frozen initial model (RPT's proxy model) lies in the chunk's [lo, hi] quantile range.
    position_policy: Literal["uniform", "entropy"] = "uniform"
    entropy_quantiles: tuple[float, float] = (0.5, 1.0)
    min_context: int = Field(32, ge=1)
    horizon: int = Field(16, ge=1, description="H: target tokens scored after each thought")
    max_docs: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fits(self) -> "DataConfig":
        room = self.chunk_tokens - self.min_context - self.horizon
        if room < self.positions_per_chunk - 1:
            raise ValueError(
                f"chunk_tokens={self.chunk_tokens} leaves room for {max(room + 1, 0)} positions "
                f"after min_context={self.min_context} and horizon={self.horizon}; "
                f"positions_per_chunk={self.positions_per_chunk} cannot fit"
            )
        return self


class VllmConfig(Section):
    # The sampler's weights: "auto" = model.dtype. bfloat16 halves the engine's memory and the
    # weight push; the trainer re-scores every thought itself, so the loss uses its own log-probs.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    kv_cache_gb: float = Field(2.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1, description="None: context + thought budget + tags")
    enforce_eager: bool = True
    # Colocated engines on GPUs: 1 puts the engine's weights in CPU memory and drops its KV cache
    # while the trainer scores and updates; 2 drops the weights too (they are pushed back anyway).
    # 0 keeps it resident. Needs vLLM's sleep mode (CUDA/ROCm); refused elsewhere.
    sleep_level: Literal[0, 1, 2] = 0
    # Colocated engines sharded over this many consecutive ranks (a TP group); the ranks of a
    # group sample their prompts together. Must divide the world size.
    tensor_parallel_size: int = Field(1, ge=1)


class ServerConfig(Section):
    """Rollouts from separately started vLLM servers (`rntp serve`), for models too large to colocate."""

    urls: list[str] = Field([], description="base URLs of the servers, e.g. http://node7:8000")
    # How new weights reach the servers, through vLLM's weight-transfer API: nccl (vLLM's, GPUs)
    # or gloo (ours, any machine); auto = nccl where CUDA is available. Start the servers with the same.
    weight_transfer: Literal["auto", "nccl", "gloo"] = "auto"
    # Where the servers' workers meet trainer rank 0 (an address of this host they can reach); None =
    # 127.0.0.1 when every server is local, else this host's address on the interface that routes to
    # the first remote server (a warning if that is loopback, e.g. 127.0.1.1 from /etc/hosts: set it
    # then). Port 0 picks a free one.
    transfer_address: str | None = None
    transfer_port: int = Field(0, ge=0, lt=65536)
    timeout_s: float = Field(600, gt=0, description="per request and per transfer")
    startup_timeout_s: float = Field(600, gt=0, description="how long to wait for the servers to answer")
    max_concurrent_requests: int = Field(64, ge=1)


class RolloutConfig(Section):
    # server: separately started vLLM servers (`rollout.server`); vllm: an engine per rank (or TP
    # group) in the trainer's processes; hf: transformers generate on the training model.
    sampler: Literal["auto", "vllm", "hf", "server"] = "auto"
    group_size: int = Field(4, ge=2, description="G: thoughts per position")
    max_thought_tokens: int = Field(32, ge=1, description="T: thought budget")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    # After each weight push, compare the sampler's log-probs of one rollout with the trainer's
    # (metric sync/max_logprob_diff); every N steps, 0 = off. vLLM only.
    check_sync_every: int = Field(0, ge=0)
    vllm: VllmConfig = VllmConfig()
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _server_named(self) -> "RolloutConfig":
        if self.sampler == "server" and not self.server.urls:
            raise ValueError("rollout.sampler=server needs rollout.server.urls (start servers with `rntp serve`)")
        return self


class RewardConfig(Section):
    name: str = "target_logprob"
    modules: list[str] = Field([], description="modules to import first: where your own @register_reward live")
    # A weighted sum of registered rewards, e.g. {target_logprob_mean: 1.0, next_token_accuracy: 0.5};
    # replaces `name` when set.
    weights: dict[str, float] | None = None
    # The model that gives the no-think score s0 for rewards that use it (info_gain, vrcli).
    baseline: Literal["policy", "initial", "ema"] = "policy"
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA teacher decay (RLP used 0.999)")
    k: int = Field(1, ge=1, description="target tokens for next_token_accuracy and confidence")
    clip_min: float | None = None
    clip_max: float | None = None
    length_penalty: float = Field(0.0, ge=0, description="subtracted per sampled thought token")
    vrcli_thresholds: list[float] = [0.05, 0.1, 0.2]
    vrcli_values: list[float] = [0.5, 0.9, 1.0]

    @model_validator(mode="after")
    def _steps(self) -> "RewardConfig":
        if len(self.vrcli_thresholds) != len(self.vrcli_values):
            raise ValueError("vrcli_thresholds and vrcli_values must have the same length")
        if self.vrcli_thresholds != sorted(self.vrcli_thresholds):
            raise ValueError("vrcli_thresholds must be increasing")
        return self


class GRPOConfig(Section):
    advantage_scale: Literal["group", "batch", "none"] = "group"
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    # seq_mean: GRPO (mean per thought, then over thoughts); token_mean: DAPO (over all
    # thought tokens); token_sum: Dr. GRPO (sum over tokens / (thoughts * max_thought_tokens)).
    loss_aggregation: Literal["seq_mean", "token_mean", "token_sum"] = "seq_mean"
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the initial policy; 0 = off")
    nll_coef: float = Field(0.0, ge=0, description="weight of next-token loss on the target")
    epochs: int = Field(1, ge=1, description="optimizer passes over each batch of rollouts")
    # Dynamic sampling on spread, not mean (rewards are continuous): drop groups whose reward std
    # is at most this before the update (0 = keep all). Quiet-STaR drops negative advantages.
    min_group_std: float = Field(0.0, ge=0)
    drop_negative_advantages: bool = False
    # The sampler (vLLM: its own kernels, often bf16) and the trainer give the same thought different
    # log-probs. Importance weights exp(trainer old - sampler) per thought token correct for it:
    # token_tis caps each at is_cap (truncated IS), seq_tis caps a thought's product, token_mask and
    # seq_mask (by the thought's geometric mean) drop what leaves is_band; none = off. On by default:
    # weights are ~1 when the two agree, and the cost is a few element-wise ops (see README).
    mismatch_correction: Literal["none", "token_tis", "seq_tis", "token_mask", "seq_mask"] = "token_tis"
    is_cap: float = Field(2.0, ge=1, description="C: the largest importance weight (token_tis, seq_tis)")
    is_band: tuple[float, float] = Field((0.5, 2.0), description="ratios kept by token_mask and seq_mask")

    @model_validator(mode="after")
    def _band(self) -> "GRPOConfig":
        lo, hi = self.is_band
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"grpo.is_band={self.is_band} must hold 1 and be positive: (lo <= 1 <= hi)")
        return self


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # torch's fused AdamW (CPU and CUDA): the same update in one kernel; false for the for-each one
    fused: bool = True


class DistConfig(Section):
    """Multi-process training under torchrun. The batch (`train.positions_per_step`) is global."""

    backend: Literal["auto", "none", "ddp", "deepspeed", "fsdp2"] = "auto"  # auto: ddp if world > 1
    zero_stage: Literal[1, 2, 3] = 2
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON; default configs/deepspeed/zero<stage>.json")
    weight_bucket_mb: float = Field(256, gt=0, description="weights pushed to the sampler in buckets of this size")


class LogConfig(Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rntp"
    wandb_group: str | None = None
    progress: bool = True
    plot: bool = True
    sample_thoughts: int = Field(2, ge=0, description="thoughts printed to samples.jsonl per step")


class EvalConfig(Section):
    """Held-out evaluation, by `rntp eval` and periodically during training."""

    every: int = Field(0, ge=0, description="during training: evaluate every N steps (0 = off)")
    data: str | None = Field(None, description="held-out source; None = data.source with `split`")
    split: str = "heldout"
    num_positions: int = Field(32, ge=1)
    thoughts: int = Field(4, ge=1, description="k sampled thoughts per position")
    max_thought_tokens: int | None = Field(None, ge=1, description="None = rollout.max_thought_tokens")
    temperature: float = Field(1.0, gt=0)
    seed: int = Field(1234, ge=0)
    batch_positions: int = Field(8, ge=1, description="positions per scoring batch (bounds memory)")
    # Difficulty = next-token entropy (nats) of the base model at the position.
    easy_below: float = Field(1.0, ge=0)
    hard_above: float = Field(3.0, ge=0)
    base_model: str | None = Field(None, description="model that defines difficulty; None = model.name_or_path")
    samples: int = Field(4, ge=0, description="thoughts kept for reading")


class TrainConfig(Section):
    steps: int = Field(20, ge=1)
    positions_per_step: int = Field(4, ge=1, description="groups (positions) per optimizer step")
    micro_batch: int = Field(8, ge=1, description="sequences per forward/backward")
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    # Score and update each context once for all its thoughts (and a chunk once for all its
    # positions): shared-prefix packs. false computes the context once per thought (same results).
    shared_prefix: bool = True
    seed: int = Field(0, ge=0)


class Config(Section):
    run_dir: str = "runs/default"
    resume: str | None = None
    # Start afresh in a run_dir that already holds a run, deleting its checkpoints, metrics and
    # samples. Without it (or `resume`) such a folder is refused, so no run is lost by accident.
    overwrite: bool = False
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    grpo: GRPOConfig = GRPOConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()
    log: LogConfig = LogConfig()


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says why."""


def parse_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with a syntax error turned into one line that names the file or override."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at}: {problem}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key")
    return keys, parse_yaml(raw, f"override {text!r}") if raw.strip() else None


def set_nested(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for text in overrides:
        keys, value = parse_override(text)
        set_nested(tree, keys, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [f"invalid config{f' {path}' if path else ''}:"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
