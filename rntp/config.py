"""Typed, validated run configuration.

A run is described by one YAML file plus `key.sub=value` overrides. Every section
forbids unknown keys, so a typo is a clear error before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

if TYPE_CHECKING:
    from rollout.spans import ThinkTags


class Section(BaseModel):
    """A config section. Each field's docstring is its documentation: `config_table()` renders the
    configuration table of docs/configuration.md from them (a test keeps the two in step)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

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


class LoRAConfig(Section):
    """LoRA adapters (PEFT) instead of full weights: only the adapter trains; samplers serve it on the
    base they hold once, and a push moves the adapter, not the model (`rntp/lora.py`)."""

    enabled: bool = False
    """Train a LoRA adapter on the frozen base instead of all weights (plain, DDP, DeepSpeed ZeRO-1/2)."""
    rank: int = Field(16, ge=1, le=512)
    """r, the adapter's rank (vLLM serves up to 512)."""
    alpha: float = Field(32.0, gt=0)
    """lora_alpha: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input while training (off in scoring, sampling and the frozen views)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names (suffixes) that get an adapter, or `all-linear`: every linear layer but the output head.
    Embeddings and the head are refused (vLLM does not serve adapters on them)."""


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m"
    """A local Hugging Face folder, a hub name (where the network allows), or `smollm2-135m`, the offline
    default that `rntp prepare-model` provisions."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype; `bfloat16` trains in pure bf16 (GPU)."""
    autocast_bf16: bool = False
    """Autocast the training forward to bfloat16 while keeping float32 master weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (transformers' gradient checkpointing)."""
    trust_remote_code: bool = False
    """Let transformers run a model's own code from its folder or the hub."""
    lora: LoRAConfig = LoRAConfig()


class DataConfig(Section):
    source: str = "stdlib-docs"
    """`stdlib-docs` (the offline default corpus), a `.txt` / `.jsonl` / `.parquet` file or folder of them,
    a `datasets.save_to_disk` folder, or a hub dataset name."""
    split: str = "train"
    """The split to read."""
    subset: str | None = Field(None, description="a hub dataset's configuration name, e.g. sample-10BT")
    text_column: str = "text"
    """The column (or JSONL key) that holds a document's text."""
    streaming: bool = False
    """Stream the corpus instead of loading it, for corpora larger than memory."""
    shuffle: bool = True
    """Shuffle documents (through a buffer when streaming)."""
    shuffle_buffer: int = Field(1000, ge=1)
    """Documents in the shuffle buffer when streaming."""
    chunk_tokens: int = Field(256, ge=8)
    """Tokens per chunk a document is cut into."""
    positions_per_chunk: int = Field(1, ge=1)
    """K positions drawn per chunk."""
    position_policy: Literal["uniform", "entropy"] = "uniform"
    """`uniform`: any position in bounds. `entropy`: only positions whose next-token entropy under the frozen
    initial model (RPT's proxy model) lies in the chunk's `entropy_quantiles` range."""
    entropy_quantiles: tuple[float, float] = (0.5, 1.0)
    """The [lo, hi] quantiles of a chunk's entropies that `position_policy=entropy` keeps."""
    min_context: int = Field(32, ge=1)
    """Fewest context tokens before a position."""
    horizon: int = Field(16, ge=1, description="H: target tokens scored after each thought")
    max_docs: int | None = Field(None, ge=1)
    """Read at most this many documents (none = all)."""
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    """A held-out split carved from a corpus with one split (fineweb-edu): this share of `split`'s documents,
    chosen by a hash of their text, is never trained on, and every other split (`eval.split`) reads exactly
    them. 0 = off: other splits are the source's own."""
    seed: int = Field(0, ge=0)
    """Seed of the document shuffle and the position draws."""

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
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The sampler's weights: `auto` = `model.dtype`. bfloat16 halves the engine's memory and the weight
    push; the trainer re-scores every thought itself, so the loss uses its own log-probs."""
    kv_cache_gb: float = Field(2.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of a GPU's memory a colocated engine may take."""
    max_model_len: int | None = Field(None, ge=1, description="None: context + thought budget + tags")
    enforce_eager: bool = True
    """No CUDA graphs (vLLM's eager mode)."""
    sleep_level: Literal[0, 1, 2] = 0
    """Colocated engines on GPUs: 1 puts the engine's weights in CPU memory and drops its KV cache while the
    trainer scores and updates; 2 drops the weights too (they are pushed back anyway); 0 keeps it resident.
    Needs vLLM's sleep mode (CUDA/ROCm); refused elsewhere."""
    tensor_parallel_size: int = Field(1, ge=1)
    """Colocated engines sharded over this many consecutive ranks (a TP group); the ranks of a group sample
    their prompts together. Must divide the world size."""


class ServerConfig(Section):
    """Rollouts from separately started vLLM servers (`rntp serve`), for models too large to colocate."""

    urls: list[str] = Field([], description="base URLs of the servers, e.g. http://node7:8000")
    weight_transfer: Literal["auto", "nccl", "gloo"] = "auto"
    """How new weights reach the servers, through vLLM's weight-transfer API: `nccl` (vLLM's, GPUs) or `gloo`
    (ours, any machine); `auto` = nccl where CUDA is available. Start the servers with the same."""
    transfer_address: str | None = None
    """Where the servers' workers meet trainer rank 0 (an address of this host they can reach); none =
    127.0.0.1 when every server is local, else this host's address on the interface that routes to the first
    remote server (a warning if that is loopback, e.g. 127.0.1.1 from /etc/hosts: set it then)."""
    transfer_port: int = Field(0, ge=0, lt=65536)
    """Port of that meeting point; 0 picks a free one."""
    timeout_s: float = Field(600, gt=0, description="per request and per transfer")
    startup_timeout_s: float = Field(600, gt=0, description="how long to wait for the servers to answer")
    max_concurrent_requests: int = Field(64, ge=1)
    """HTTP requests in flight at once, per rank."""
    adapter_dir: str | None = None
    """LoRA runs: the folder trainer rank 0 writes the adapter to at every push, for the servers to load
    (`/v1/load_lora_adapter`): a path they read (a shared file system when they run elsewhere). None = a
    temporary folder on this machine, for servers on it only."""
    secret_file: str | None = None
    """File holding the shared secret every route of an `rntp serve` server but /health requires (the
    trainer sends it as a bearer token), readable by its owner only (mode 600). None = the secret in
    $RNTP_SERVER_SECRET, else `~/.cache/rntp/server-secret`, which `rntp serve` makes if missing. The SLURM
    launcher makes one per job. Give servers and trainers the same."""


class RolloutConfig(Section):
    sampler: Literal["auto", "vllm", "hf", "server"] = "auto"
    """`vllm`: an engine per rank (or TP group) in the trainer's processes; `hf`: transformers `generate` on
    the training model; `server`: separately started vLLM servers (`rollout.server`); `auto`: vllm where
    installed, else hf."""
    group_size: int = Field(4, ge=2, description="G: thoughts per position")
    max_thought_tokens: int = Field(32, ge=1, description="T: thought budget")
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (the trainer's log-probs of thought tokens use the same)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (the trainer's log-probs of thought tokens use the same)."""
    open_tag: str = "<think>"
    """Text that opens a thought."""
    close_tag: str = "</think>"
    """Text that closes a thought; sampling stops at it."""
    tag_tokens: Literal["add", "text"] = "add"
    """`add`: where the model's tokenizer splits a tag into pieces, train a copy of the model with both tags
    as added special tokens (`<think>` starts as the mean of its pieces, `</think>` as the full stop, so a
    thought can end in one draw; `rntp/think_tokens.py`); models that have them already (Qwen3, R1) are used
    as they are. `text`: the tags stay plain text (a small model then rarely closes a thought)."""
    seed_requests: bool = True
    """vLLM samplers: a seed on every request, so a run (and a resumed run) draws the same thoughts for
    the same seed and weights. false lets vLLM draw every request's noise in one batched call instead of a
    Python loop over seeded requests at each decode step, but a resumed run then draws other thoughts than
    an uninterrupted one. (It does not enable FlashInfer's sampler: RNTP's engines ask for processed
    log-probs, which vLLM's FlashInfer path cannot give, so they sample natively either way.)"""
    max_staleness: int = Field(0, ge=0)
    """k: the batch of step t is sampled by the weights after step t - 1 - k, in the background while
    the trainer works on earlier batches (`rntp/rollout_queue.py`); 0 = the synchronous loop. Server
    mode only (colocated engines share the trainer's GPUs); the lag is corrected like any
    sampler/trainer mismatch (`grpo.mismatch_correction`)."""
    check_sync_every: int = Field(0, ge=0)
    """After a weight push every N steps, compare the sampler's log-probs of one rollout with the trainer's
    (metric `sync/max_logprob_diff`); 0 = off. vLLM only."""
    vllm: VllmConfig = VllmConfig()
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _server_named(self) -> "RolloutConfig":
        if self.sampler == "server" and not self.server.urls:
            raise ValueError("rollout.sampler=server needs rollout.server.urls (start servers with `rntp serve`)")
        if self.max_staleness and self.sampler != "server":
            raise ValueError(f"rollout.max_staleness={self.max_staleness} needs rollout.sampler=server: a colocated "
                             "engine shares the trainer's devices, so its loop stays synchronous")
        return self


class RewardConfig(Section):
    name: str = "target_logprob"
    """The reward, by its registered name (see `rntp rewards`)."""
    modules: list[str] = Field([], description="modules to import first: where your own @register_reward live")
    weights: dict[str, float] | None = None
    """A weighted sum of registered rewards, e.g. `{target_logprob_mean: 1.0, next_token_accuracy: 0.5}`;
    replaces `name` when set."""
    baseline: Literal["policy", "initial", "ema"] = "policy"
    """The model that gives the no-think score s0 for rewards that use it (info_gain, vrcli): the policy,
    a frozen copy of the initial model, or an EMA teacher."""
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA teacher decay (RLP used 0.999)")
    k: int = Field(1, ge=1, description="target tokens for next_token_accuracy and confidence")
    clip_min: float | None = None
    """Clip rewards below at this value (none = no clip)."""
    clip_max: float | None = None
    """Clip rewards above at this value (none = no clip)."""
    length_penalty: float = Field(0.0, ge=0, description="subtracted per sampled thought token")
    vrcli_thresholds: list[float] = [0.05, 0.1, 0.2]
    """VR-CLI's improvement thresholds, increasing."""
    vrcli_values: list[float] = [0.5, 0.9, 1.0]
    """The reward at or above each threshold."""

    @model_validator(mode="after")
    def _steps(self) -> "RewardConfig":
        if len(self.vrcli_thresholds) != len(self.vrcli_values):
            raise ValueError("vrcli_thresholds and vrcli_values must have the same length")
        if self.vrcli_thresholds != sorted(self.vrcli_thresholds):
            raise ValueError("vrcli_thresholds must be increasing")
        return self


class GRPOConfig(Section):
    advantage_scale: Literal["group", "batch", "none"] = "group"
    """Advantages r - mean(group) divided by the group's std (`group`, GRPO), the std over the whole batch
    and all ranks (`batch`), or nothing (`none`, Dr. GRPO)."""
    clip_low: float = Field(0.2, ge=0)
    """Lower clip of the ratio, 1 - clip_low."""
    clip_high: float = Field(0.28, ge=0)
    """Upper clip of the ratio, 1 + clip_high (DAPO's clip-higher when above clip_low)."""
    loss_aggregation: Literal["seq_mean", "token_mean", "token_sum"] = "seq_mean"
    """`seq_mean`: GRPO (mean per thought, then over thoughts); `token_mean`: DAPO (over all thought tokens);
    `token_sum`: Dr. GRPO (sum over tokens / (thoughts x max_thought_tokens))."""
    pg_coef: float = Field(1.0, ge=0)
    """Weight of the clipped policy-gradient surrogate. 0 is the ablation's control: the same sampling,
    scoring and next-token terms (`nll_coef` after the sampled thoughts, `no_think_nll_coef`) and the KL
    term, but no gradient from the rewards, so a design's gain over it is what the rewards teach."""
    kl_coef: float = Field(0.0, ge=0, description="k3 KL to the initial policy; 0 = off")
    nll_coef: float = Field(0.0, ge=0)
    """Weight of the next-token loss on the true continuation after each thought (Quiet-STaR trains it too):
    teaches the model to read on after `</think>`."""
    no_think_nll_coef: float = Field(0.0, ge=0)
    """Weight of the plain next-token loss on the same continuations without a thought, which keeps the
    language model where RL and `nll_coef` would move it (InstructGPT's PPO-ptx mixes pre-training in alike)."""
    epochs: int = Field(1, ge=1, description="optimizer passes over each batch of rollouts")
    min_group_std: float = Field(0.0, ge=0)
    """Dynamic sampling on spread, not mean (rewards are continuous): drop groups whose reward std is at most
    this before the update (0 = keep all)."""
    drop_negative_advantages: bool = False
    """Clamp advantages at 0, as Quiet-STaR drops thoughts worse than their group."""
    mismatch_correction: Literal["none", "token_tis", "seq_tis", "token_mask", "seq_mask"] = "token_tis"
    """The sampler (vLLM: its own kernels, often bf16) and the trainer give the same thought different
    log-probs. Importance weights exp(trainer old - sampler) per thought token correct for it: `token_tis`
    caps each at is_cap (truncated IS), `seq_tis` caps a thought's product, `token_mask` and `seq_mask` (by
    the thought's geometric mean) drop what leaves is_band; `none` = off."""
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
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.99)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up (from `transformers.get_scheduler`), advanced per optimizer step
    (a step whose groups were all dropped leaves the lr as it was, on every backend)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up, in training steps."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the gradient norm to this."""
    fused: bool = True
    """torch's fused AdamW (CPU and CUDA): the same update in one kernel (clip + step 0.25 s -> 0.08 s for
    135M on 2 cores); false for the for-each one."""


class DistConfig(Section):
    """Multi-process training under torchrun. The batch (`train.positions_per_step`) is global."""

    backend: Literal["auto", "none", "ddp", "deepspeed", "fsdp2"] = "auto"
    """The training engine: `auto` = ddp on several processes, none on one."""
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON; default configs/deepspeed/zero<stage>.json")
    weight_bucket_mb: float = Field(256, gt=0, description="weights pushed to the sampler in buckets of this size")


class LogConfig(Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """Weights & Biases: `online` with `WANDB_API_KEY`, `offline`, or `disabled`."""
    wandb_project: str = "rntp"
    """W&B project."""
    wandb_group: str | None = None
    """W&B group (a sweep sets it)."""
    progress: bool = True
    """Show a progress bar."""
    plot: bool = True
    """Write training.png at the end."""
    sample_thoughts: int = Field(2, ge=0, description="thoughts printed to samples.jsonl per step")


class EvalConfig(Section):
    """Held-out evaluation, by `rntp eval` and periodically during training."""

    every: int = Field(0, ge=0, description="during training: evaluate every N steps (0 = off)")
    data: str | None = Field(None, description="held-out source; None = data.source with `split`")
    split: str = "heldout"
    """The held-out split."""
    num_positions: int = Field(32, ge=1)
    """Held-out positions, drawn once."""
    thoughts: int = Field(4, ge=1, description="k sampled thoughts per position")
    max_thought_tokens: int | None = Field(None, ge=1, description="None = rollout.max_thought_tokens")
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the evaluation's thoughts."""
    seed: int = Field(1234, ge=0)
    """Seed of the held-out positions and thoughts."""
    batch_positions: int = Field(8, ge=1, description="positions per scoring batch (bounds memory)")
    bucket_by: Literal["entropy", "logprob"] = "entropy"
    """What makes a held-out position hard, measured once with the starting model (`base_model`): `entropy`,
    its next-token entropy there (nats, RPT's proxy); `logprob`, its log-prob of the true next token, as
    -log p (nats), so that higher is harder in both."""
    buckets: Literal["fixed", "terciles"] = "fixed"
    """How the easy / medium / hard buckets are cut: `fixed` at `easy_below` and `hard_above`; `terciles` at
    the 1/3 and 2/3 quantiles of the evaluation set's values (about a third of the positions each, so that
    no bucket is nearly empty). Fixed once per evaluation set: every checkpoint reads the same buckets."""
    easy_below: float = Field(1.0, ge=0)
    """`buckets=fixed`: a position is easy below this value of `bucket_by` (nats)."""
    hard_above: float = Field(3.0, ge=0)
    """`buckets=fixed`: a position is hard above this value of `bucket_by` (nats)."""
    base_model: str | None = Field(None, description="model that defines difficulty; None = model.name_or_path")
    samples: int = Field(4, ge=0, description="thoughts kept for reading")

    @model_validator(mode="after")
    def _buckets(self) -> "EvalConfig":
        if self.buckets == "fixed" and self.easy_below > self.hard_above:
            raise ValueError(f"eval.easy_below={self.easy_below} is above eval.hard_above={self.hard_above}: easy "
                             "and hard positions would overlap")
        if self.buckets == "terciles" and self.num_positions < 3:
            raise ValueError(f"eval.buckets=terciles needs eval.num_positions >= 3, not {self.num_positions}")
        return self


class TrainConfig(Section):
    steps: int = Field(20, ge=1)
    """Training steps."""
    positions_per_step: int = Field(4, ge=1, description="groups (positions) per optimizer step")
    micro_batch: int = Field(8, ge=1)
    """Thoughts per forward/backward (a pack). Whole groups share a pack while they fit; below the
    group size a group's thoughts are split over packs, each with its context (same gradients)."""
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    shared_prefix: bool = True
    """Score and update each context once for all its thoughts (and a chunk once for all its positions):
    shared-prefix packs. false computes the context once per thought (same results)."""
    attention: Literal["blocks", "flex", "dense"] = "blocks"
    """Attention over packs (`rntp/forward/attention.py`): `blocks` computes the trunk causally and each
    position's branches over the context they see, without a mask tensor (torch's flash kernels on
    GPUs; every device); `flex` uses FlexAttention with a BlockMask (CUDA only: it has no backward
    on CPU); `dense` is the [W, W]-mask reference, for tests and the benchmark."""
    seed: int = Field(0, ge=0)
    """Seed of the run (sampling, initialisation of RNGs)."""


class Config(Section):
    run_dir: str = "runs/default"
    """Where the run writes config, metrics, samples and checkpoints."""
    resume: str | None = None
    """A checkpoint or run folder to continue from."""
    overwrite: bool = False
    """Start afresh in a run_dir that already holds a run, deleting its checkpoints, metrics and samples.
    Without it (or `resume`) such a folder is refused, so no run is lost by accident."""
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

    @model_validator(mode="after")
    def _lora_backend(self) -> "Config":
        if self.model.lora.enabled and (self.dist.backend == "fsdp2" or
                                        (self.dist.backend == "deepspeed" and self.dist.zero_stage == 3)):
            raise ValueError("model.lora.enabled needs dist.backend none, ddp or deepspeed with zero_stage 1-2, not "
                             f"{self.dist.backend}{' zero_stage 3' if self.dist.backend == 'deepspeed' else ''}: "
                             "the adapter and its optimizer state are small, and sharding the frozen base (FSDP2's "
                             "meta-device build, ZeRO-3's partitioned layers) under PEFT's adapter is not implemented")
        if self.model.lora.enabled and self.rollout.vllm.sleep_level == 2:
            raise ValueError("model.lora.enabled with rollout.vllm.sleep_level=2: level 2 drops the engine's base "
                             "weights, which a LoRA run never pushes back (only the adapter moves); use 1")
        return self


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


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config as a dump gives it (nested dicts) keyed by dotted names, as overrides write them."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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


def max_sequence_len(cfg: Config, tags: ThinkTags) -> int:
    """The longest sequence the sampler sees: context, open tag, thought, close tag (and slack)."""
    return cfg.rollout.vllm.max_model_len or (cfg.data.chunk_tokens + len(tags.open_ids) +
                                              cfg.rollout.max_thought_tokens + len(tags.close_ids) + 8)


def check_max_model_len(cfg: Config, tags: ThinkTags) -> None:
    """A sampler length below the longest sequence (chunk, tags, thought budget) would fail mid-run."""
    given = cfg.rollout.vllm.max_model_len
    thought = max(cfg.rollout.max_thought_tokens, (cfg.eval.max_thought_tokens or 0) if cfg.eval.every else 0)
    need = cfg.data.chunk_tokens + len(tags.open_ids) + thought + len(tags.close_ids)
    if given is not None and given < need:
        raise ValueError(f"rollout.vllm.max_model_len={given} is below the {need} tokens the longest sequence needs "
                         f"(data.chunk_tokens {cfg.data.chunk_tokens} + open tag {len(tags.open_ids)} + thought "
                         f"{thought} + close tag {len(tags.close_ids)}); raise it or leave it unset")


def config_table(model: type[BaseModel] = Config) -> str:
    """The configuration table of docs/configuration.md: one row per key, its default and its field docstring."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def show(value) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, str):
            return f"`{value}`" if value else "`\"\"`"
        if isinstance(value, (list, tuple, dict)) and not value:
            return "[]" if isinstance(value, list) else "{}" if isinstance(value, dict) else "()"
        return str(value)

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{prefix}{name}.")
                continue
            meaning = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {show(field.default)} | {meaning} |")

    walk(model, "")
    return "\n".join(rows) + "\n"


TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"
CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def render_config_table(page: str) -> str:
    """`page` with the text between the config-table markers replaced by `config_table()`."""
    head, rest = page.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{config_table()}{TABLE_END}{tail}"


if __name__ == "__main__":  # python -m rntp.config: rewrite the configuration table in docs/configuration.md
    CONFIG_DOC.write_text(render_config_table(CONFIG_DOC.read_text()))
