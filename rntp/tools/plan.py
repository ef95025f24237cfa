"""`rntp plan`: memory per GPU and FLOPs per step of a config, by arithmetic, with no model weights.

It reads the model's `config.json` (a local folder, or the hub cache; it never downloads) or a
built-in shape (`--model-shape`), and prints per GPU the training state by backend, the frozen
copies, the activations of one micro-pass at the pack shape, a colocated vLLM engine, their total
against the GPU's memory (FITS / DOES NOT FIT), and the FLOPs of one step. Everything is an
estimate from the formulas below (GB = 1e9 bytes); none of it is measured on a GPU (the activation
terms are checked against a CPU peak in tests/unit/test_plan.py). Not counted: the CUDA context, NCCL's
own buffers, allocator fragmentation, parameter gradients before ZeRO takes them (the tied head's
gradient lives through the whole backward), and other transient tensors of the backward pass.

Notation (as in docs/packed-forward.md's scaling note): P = train.positions_per_step (global), G =
rollout.group_size, C = data.chunk_tokens (the worst-case context; a real context is at most
C - H, so trunks are overestimated by H), T = rollout.max_thought_tokens, H = data.horizon,
3 = the tag tokens of a branch `[open][thought][close][target]`, N = non-embedding parameters,
L layers. The formulas are small pure functions so `rntp.tools.bench` and `rntp.tools.gpu_check` can import them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rntp.config import Config

GB = 1e9
TAGS = 3  # tokens of a branch besides thought and target: [open] ... [close] (an upper bound: 2 on Qwen3)


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder-only transformer that memory and FLOPs depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    qk_norm: bool = False  # Qwen3 normalises q and k per head

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention (q, k, v, o, biases, q/k norms), SwiGLU MLP
        (gate, up, down) and the two RMSNorms."""
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim
        if self.qkv_bias:
            attention += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            attention += 2 * self.head_dim
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def non_embedding(self) -> int:
        """N: every parameter but the embedding and the output head (the final norm included)."""
        return self.layers * self.layer_params() + self.hidden

    def params(self) -> int:
        """All parameters: N plus the embedding, plus the head when it is not tied to it."""
        return self.non_embedding() + self.vocab * self.hidden * (1 if self.tied else 2)


# Architectures of real models (their config.json values): the planner counts them, and the GPU check
# builds them with random weights.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # for a smoke run on CPU (tests): the same code path in seconds
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=4096, tie_word_embeddings=True),
}
# Qwen3 (q/k norms, head_dim set apart from hidden / heads): the numbers of Qwen/Qwen3-1.7B's and
# Qwen/Qwen3-8B's config.json (their sources are cited in `builtin_shapes`).
QWEN3_SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}

def _qwen2(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
           vocab_size, tie_word_embeddings) -> Shape:
    """A shape of SHAPES (Qwen2 architecture: head_dim = hidden / heads, q/k/v biases)."""
    return Shape(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                 hidden_size // num_attention_heads, intermediate_size, vocab_size, tie_word_embeddings,
                 qkv_bias=True)


def builtin_shapes() -> dict[str, Shape]:
    """Shapes `--model-shape` can name. Qwen2.5 (and `tiny`) are rntp.tools.gpu_check's, from their
    config.json. Qwen3, from the published config.json of each model:
    - Qwen3-1.7B(-Base): hidden_size 2048, num_hidden_layers 28, num_attention_heads 16,
      num_key_value_heads 8, head_dim 128, intermediate_size 6144, vocab_size 151936,
      tie_word_embeddings true (Qwen/Qwen3-1.7B config.json, as mirrored in public test fixtures;
      the same numbers in slime's scripts/models/qwen3-1.7B.sh: 28 layers, hidden 2048, ffn 6144,
      16 heads, 8 query groups, kv-channels 128, vocab 151936, qk-layernorm). 1.72 B parameters.
    - Qwen3-8B(-Base): hidden_size 4096, num_hidden_layers 36, num_attention_heads 32,
      num_key_value_heads 8, head_dim 128, intermediate_size 12288, vocab_size 151936,
      tie_word_embeddings false (Qwen/Qwen3-8B config.json, copied verbatim on the hub). 8.19 B.
    """
    shapes = {name: _qwen2(**numbers) for name, numbers in SHAPES.items()}
    for name, n in QWEN3_SHAPES.items():
        shapes[name] = Shape(n["hidden_size"], n["num_hidden_layers"], n["num_attention_heads"],
                             n["num_key_value_heads"], n["head_dim"], n["intermediate_size"], n["vocab_size"],
                             tied=n["tie_word_embeddings"], qk_norm=True)
    return shapes


class PlanError(ValueError):
    """Input `rntp plan` cannot use (an unknown shape, a missing config.json); one line."""


def shape_from_config(config) -> Shape:
    """A Shape from a transformers config (its text config for multimodal ones)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise PlanError(f"{config.model_type}: mixture-of-experts models are not modelled by rntp plan")
    heads = config.num_attention_heads
    kind = getattr(config, "model_type", "")
    return Shape(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 intermediate=config.intermediate_size, vocab=config.vocab_size,
                 tied=bool(getattr(config, "tie_word_embeddings", False)),
                 qkv_bias=bool(getattr(config, "attention_bias", kind == "qwen2")),
                 qk_norm=kind.startswith("qwen3"))


def resolve_shape(name_or_path: str, shape: str | None = None) -> tuple[Shape, str]:
    """The model's shape and where it came from: a built-in `shape`, else the model's config.json
    (the offline default alias, a local folder, or a hub name already in the local cache)."""
    shapes = builtin_shapes()
    if shape is not None:
        if shape not in shapes:
            raise PlanError(f"unknown --model-shape {shape!r}; known: {', '.join(sorted(shapes))}")
        return shapes[shape], f"built-in shape {shape}"
    from rntp.prepare import DEFAULT_MODEL_ALIAS, default_model_dir

    path = default_model_dir() if name_or_path == DEFAULT_MODEL_ALIAS else Path(name_or_path).expanduser()
    local = name_or_path == DEFAULT_MODEL_ALIAS or name_or_path.startswith((".", "/", "~")) or path.exists()
    guess = next((s for s in sorted(shapes, key=len, reverse=True) if s in name_or_path.lower()), None)
    hint = f"pass --model-shape {guess}" if guess else f"pass --model-shape (one of {', '.join(sorted(shapes))})"
    if local and not (path / "config.json").is_file():
        raise PlanError(f"model.name_or_path={name_or_path}: no config.json at {path}; {hint}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path) if local else name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"cannot read the config.json of {name_or_path} (not a local folder or in the hub "
                        f"cache; rntp plan never downloads: {reason[:160]}); {hint}") from None
    return shape_from_config(config), f"{path / 'config.json'}" if local else f"hub cache: {name_or_path}"


# ---- the pack ---------------------------------------------------------------------------------


def pack_shape(C: int, H: int, T: int, G: int, micro_batch: int) -> dict:
    """One micro-pass's pack (`rntp.forward.packing.plan_packs`): at most `micro_batch` thoughts, whole groups
    while they fit (k = micro_batch // G groups, each its own trunk), else a group split over
    ceil(G / micro_batch) packs, each holding its context again. A trunk is C + H tokens, a branch
    3 + T + H. W = trunks x (C + H) + branches x (3 + T + H)."""
    if micro_batch >= G:
        trunks, branches, copies = micro_batch // G, (micro_batch // G) * G, 1
    else:
        trunks, branches, copies = 1, micro_batch, math.ceil(G / micro_batch)
    branch = TAGS + T + H
    return {"trunks": trunks, "branches": branches, "trunk_tokens": C + H, "branch_tokens": branch,
            "tokens": trunks * (C + H) + branches * branch, "trunk_copies_per_position": copies}


def row_pairs(trunk: int, branch: int, limit: int, branches: int) -> int:
    """(query, key) pairs of one packed row: its trunk causally, then `branches` branches of `branch`
    tokens, each seeing the trunk's first `limit` tokens and itself causally (`PackLayout.pairs()`)."""
    return trunk * (trunk + 1) // 2 + branches * (branch * limit + branch * (branch + 1) // 2)


def position_pairs(C: int, H: int, T: int, G: int, trunk_copies: int = 1, trunk_target: bool = True) -> int:
    """Attention pairs per position: (C+H)(C+H+1)/2 per copy of its trunk (C alone when the trunk
    holds no target) + G x [(3+T+H) x C + (3+T+H)(3+T+H+1)/2]."""
    trunk = C + (H if trunk_target else 0)
    branch = TAGS + T + H
    return trunk_copies * trunk * (trunk + 1) // 2 + G * (branch * C + branch * (branch + 1) // 2)


# ---- FLOPs --------------------------------------------------------------------------------------


def forward_flops(shape: Shape, tokens: int, reads: int, pairs: int) -> int:
    """One forward: 2N per token, the output head 2 x hidden x vocab per read token (only read
    tokens get logits), and attention 4 x L x heads x head_dim per (query, key) pair (QK^T and AV)."""
    return (2 * shape.non_embedding() * tokens + 2 * shape.hidden * shape.vocab * reads
            + 4 * shape.layers * shape.heads * shape.head_dim * pairs)


def step_flops(cfg: Config, shape: Shape) -> dict:
    """FLOPs of one training step, global (divide by the GPU count for one GPU's share).

    - sampling: P x G x T tokens decoded, 2N each (the head and the KV-cache reads come on top;
      decoding is memory-bound);
    - scoring: one forward of every pack: tokens P x copies x (C+H) + P x G x (3+T+H), reads
      P x G x (T+H) + P x H (the no-think targets), attention P x position_pairs;
    - baseline (reward.baseline ema or initial): that model's no-think forward, P x (C+H) tokens;
    - update: per epoch, the packs again (trunks of C tokens, C+H with grpo.no_think_nll_coef):
      forward + backward = 3 forwards, one more with gradient checkpointing, and the output head's
      forward once more in backward (`ChunkedLogProbs` recomputes it either way);
    - reference (grpo.kl_coef > 0): one forward of the update's packs per epoch;
    - position filter (data.position_policy=entropy): the initial model over every chunk.
    `copies` = ceil(G / train.micro_batch) when packs split groups, else 1."""
    P, G, T = cfg.train.positions_per_step, cfg.rollout.group_size, cfg.rollout.max_thought_tokens
    C, H, epochs = cfg.data.chunk_tokens, cfg.data.horizon, cfg.grpo.epochs
    copies = pack_shape(C, H, T, G, cfg.train.micro_batch)["trunk_copies_per_position"]
    branch = TAGS + T + H
    n = shape.non_embedding()
    out: dict = {"sample_tokens": P * G * T, "sample": 2 * n * P * G * T}
    score_tokens = P * copies * (C + H) + P * G * branch
    out["score_tokens"] = score_tokens
    out["score"] = forward_flops(shape, score_tokens, P * G * (T + H) + P * H,
                                 P * position_pairs(C, H, T, G, copies))
    if cfg.reward.baseline != "policy":
        out["baseline"] = forward_flops(shape, P * (C + H), P * H, P * (C + H) * (C + H + 1) // 2)
    plain = cfg.grpo.no_think_nll_coef > 0
    update_tokens = P * copies * (C + (H if plain else 0)) + P * G * branch
    reads = P * G * (T + H) + (P * H if plain else 0)
    pairs = P * position_pairs(C, H, T, G, copies, trunk_target=plain)
    body = forward_flops(shape, update_tokens, 0, pairs)
    head = forward_flops(shape, 0, reads, 0)
    passes = 3 + (1 if cfg.model.gradient_checkpointing else 0)
    out["update_tokens"] = update_tokens * epochs
    out["update"] = epochs * (passes * body + 4 * head)
    if cfg.grpo.kl_coef > 0:
        out["reference"] = epochs * (body + head)
    if cfg.data.position_policy == "entropy":
        chunks = math.ceil(P / cfg.data.positions_per_chunk)
        out["position_filter"] = forward_flops(shape, chunks * C, chunks * C, chunks * C * (C + 1) // 2)
    out["total"] = sum(v for k, v in out.items() if not k.endswith("tokens"))
    return out


# ---- memory -------------------------------------------------------------------------------------


def resolved_backend(cfg: Config, gpus: int) -> str:
    """`dist.backend` with auto resolved as the engines do: ddp on several processes, none on one."""
    return ("ddp" if gpus > 1 else "none") if cfg.dist.backend == "auto" else cfg.dist.backend


def module_dtype(cfg: Config, backend: str) -> str:
    """The dtype the trained module runs in: DeepSpeed's bf16 mode, on with model.autocast_bf16 as with
    model.dtype=bfloat16 (rntp/engines/deepspeed.py), casts the module's parameters to bf16
    (deepspeed/runtime/engine.py, _configure_distributed_model); other backends keep model.dtype."""
    if backend == "deepspeed" and cfg.model.autocast_bf16:
        return "bfloat16"
    return cfg.model.dtype


def state_bytes_per_param(backend: str, zero_stage: int, gpus: int, dtype: str) -> tuple[float, str]:
    """Bytes per parameter of weights + gradients + AdamW moments on one GPU of `gpus`; `dtype` is the
    module's (`module_dtype`).

    fp32 (no bf16 anywhere): 4 + 4 + 8 = 16 unsharded (ddp, none); ZeRO-1 4 + 4 + 8/n; ZeRO-2
    4 + 12/n; ZeRO-3 and FSDP2 16/n.
    Pure bf16 under torch: AdamW keeps its moments in the parameter dtype, so 2 + 2 + 4 = 8 (ddp,
    none) and 8/n (FSDP2). DeepSpeed's bf16 mode keeps fp32 master weights and moments, and RNTP sets
    grad_accum_dtype fp32 with it, so gradients are fp32 too: ZeRO-1 (BF16_Optimizer,
    runtime/bf16_optimizer.py: a whole fp32 gradient buffer) 2 + 4 + 12/n; ZeRO-2 (stage_1_and_2.py:
    an fp32 gradient partition beside the fp32 master partition) 2 + 16/n; ZeRO-3 16/n (not re-read)."""
    n = gpus
    if dtype == "bfloat16" and backend != "deepspeed":
        if backend == "fsdp2":
            return 8 / n, f"FSDP2, pure bf16: (2 + 2 + 4)/{n}"
        return 8.0, "pure bf16: 2 weights + 2 grads + 4 AdamW moments (bf16)"
    if backend == "deepspeed" and dtype == "bfloat16":
        per = {1: (6 + 12 / n, f"2 + 4 + 12/{n}"), 2: (2 + 16 / n, f"2 + 16/{n}"), 3: (16 / n, f"16/{n}")}
        value, text = per[zero_stage]
        return value, f"ZeRO-{zero_stage}, bf16 module + fp32 master/grads/AdamW: {text}"
    if backend == "deepspeed":
        per = {1: (8 + 8 / n, f"4 + 4 + 8/{n}"), 2: (4 + 12 / n, f"4 + 12/{n}"), 3: (16 / n, f"16/{n}")}
        value, text = per[zero_stage]
        return value, f"ZeRO-{zero_stage}, fp32 master + AdamW: {text}"
    if backend == "fsdp2":
        return 16 / n, f"FSDP2, fp32 master + AdamW: 16/{n}"
    return 16.0, f"{backend}, fp32 master + AdamW: 4 + 4 + 8, unsharded"


def layer_activation_bytes(shape: Shape, residual: int, act: int, autocast: bool) -> int:
    """Estimated bytes one decoder layer keeps for backward per token (`residual`: the module's dtype,
    `act`: the compute dtype; checked against a CPU peak in tests/unit/test_plan.py):
    - each RMSNorm upcasts its input to fp32 and keeps that copy (the input itself when it is fp32) and
      its normalised output in the module's dtype: 2 norms x hidden x (4 + residual); with q/k norms
      the same for q and k: (q_dim + kv_dim) x (4 + act);
    - in the compute dtype, the linears' inputs (2 x hidden; 5 x hidden under autocast of an fp32
      module, which casts the input once per linear), attention's roped q and k, v, its output and
      o_proj's input (3 x q_dim + 2 x kv_dim), the SwiGLU MLP's gate, up, SiLU and product (4 x I):
        2h (4 + residual) + [(q_dim + kv_dim)(4 + act)] + act x (2h or 5h + 3 q_dim + 2 kv_dim + 4 I)."""
    casts = 5 if autocast and residual == 4 else 2  # a bf16 module's activations need no cast
    norms = 2 * shape.hidden * (4 + residual) + ((shape.q_dim + shape.kv_dim) * (4 + act) if shape.qk_norm else 0)
    return norms + act * (casts * shape.hidden + 3 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.intermediate)


def logits_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the output head's log-softmax (`packed_logprobs`: ~512 MB of fp32 logits)."""
    return max(16, 2**27 // vocab)


def logits_chunk_bytes(vocab: int, reads: int, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """The output head's peak: one chunk (`ChunkedLogProbs`, at most the pack's reads) recomputed in
    backward, counted in fp32 [chunk x vocab] tensors alive at once: a plain read keeps its log-softmax
    output and makes two gradients (3); the sampling path at temperature != 1 keeps the tempered logits
    too (4); a top-p nucleus adds the sorted fp32 probabilities, their int64 order, the cumulative sum and
    masks (9, as measured on CPU)."""
    tensors = 9 if top_p < 1.0 else 4 if temperature != 1.0 else 3
    return tensors * min(logits_chunk_tokens(vocab), reads) * vocab * 4


def activation_bytes(shape: Shape, pack: dict, C: int, *, checkpointing: bool, dtype: str,
                     autocast: bool, bf16_module: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0) -> dict:
    """Activations of one micro-pass over a pack of W tokens (the update's, the largest), summed (the
    head's peak and a layer's recompute come at different moments, so the sum is an upper bound):
    - with gradient checkpointing: every layer's input, L x W x hidden x residual bytes (the module's
      dtype: bf16 under DeepSpeed's bf16 mode (`bf16_module`) or model.dtype=bfloat16, else fp32,
      autocast or not), plus one layer's full activations, recomputed in backward: W x
      layer_activation_bytes;
    - without: L x W x layer_activation_bytes;
    - the `blocks` attention's copies: per layer, each branch holds its context's keys and values
      once: branches x (C + 3 + T + H) x kv_dim x 2 (K and V) x act bytes (one layer's worth with
      checkpointing, L layers' without);
    - the head: logits_chunk_bytes over the pack's reads, branches x (T + H)."""
    residual = 2 if dtype == "bfloat16" or bf16_module else 4
    act = 2 if (residual == 2 or autocast) else 4
    W, L = pack["tokens"], shape.layers
    per_layer = W * layer_activation_bytes(shape, residual, act, autocast)
    copies = pack["branches"] * (C + pack["branch_tokens"]) * shape.kv_dim * 2 * act
    out = {"tokens": W, "layer_bytes_per_token": layer_activation_bytes(shape, residual, act, autocast)}
    if checkpointing:
        out["layer_inputs"] = L * W * shape.hidden * residual
        out["one_layer"] = per_layer
        out["attention_copies"] = copies
    else:
        out["layers"] = L * per_layer
        out["attention_copies"] = L * copies
    reads = pack["branches"] * (pack["branch_tokens"] - TAGS)
    out["logits"] = logits_chunk_bytes(shape.vocab, reads, temperature, top_p)
    out["total"] = sum(v for k, v in out.items() if k not in ("tokens", "layer_bytes_per_token"))
    return out


def zero_buckets(cfg: Config, params: int, gpus: int) -> dict:
    """ZeRO-2's gradient reduce buffer, alive through backward: `reduce_bucket_size` elements (DeepSpeed's
    default 5e8, deepspeed/runtime/zero/config.py; configs/deepspeed/zero2.json sets none) in the
    module's dtype, twice with overlap_comm, plus the flattened copy a reduction makes of one rank's
    share of it (allreduce_bucket: at most min(bucket, params / n) elements). The all-gather after the
    step writes into the flat bf16 buffer itself (runtime/utils.py, all_gather_into_tensor), so
    allgather_bucket_size allocates nothing. Zero for other backends and stages."""
    if resolved_backend(cfg, gpus) != "deepspeed" or cfg.dist.zero_stage != 2:
        return {"reduce_bucket": 0, "reduce_flatten": 0, "total": 0, "elements": 0}
    from rntp.engines.deepspeed import deepspeed_config

    zero = deepspeed_config(cfg, gpus, 1).get("zero_optimization", {})
    elements = int(zero.get("reduce_bucket_size", 5e8))
    size = 2 if module_dtype(cfg, "deepspeed") == "bfloat16" else 4
    bucket = elements * size * (2 if zero.get("overlap_comm", False) else 1)
    flatten = min(elements, math.ceil(params / gpus)) * size
    return {"reduce_bucket": bucket, "reduce_flatten": flatten, "total": bucket + flatten, "elements": elements}


def memory_per_gpu(cfg: Config, shape: Shape, gpus: int = 8, gpu_memory_gb: float = 80.0) -> dict:
    """Bytes on one GPU: training state, frozen copies, one micro-pass's activations and a colocated
    vLLM engine, and their peak against `gpu_memory_gb`. With rollout.vllm.sleep_level > 0 the
    engine leaves the GPU while the trainer scores and updates, so the peak is the larger of
    (state + frozen + engine) and (state + frozen + activations)."""
    params, dtype = shape.params(), cfg.model.dtype
    dtype_bytes = 2 if dtype == "bfloat16" else 4
    backend = resolved_backend(cfg, gpus)
    per_param, state_text = state_bytes_per_param(backend, cfg.dist.zero_stage, gpus, module_dtype(cfg, backend))
    sharded = backend == "fsdp2" or (backend == "deepspeed" and cfg.dist.zero_stage == 3)
    frozen: dict = {}
    if cfg.reward.baseline == "ema":
        frozen["ema_teacher"] = (4 * params, "EMA teacher, fp32 (4 B/param), whole on every GPU")
    needs_initial = cfg.grpo.kl_coef > 0 or cfg.reward.baseline == "initial" or cfg.data.position_policy == "entropy"
    if needs_initial:
        frozen["initial_model"] = (dtype_bytes * params, f"initial model, {dtype} ({dtype_bytes} B/param)")
    sampler = cfg.rollout.sampler
    if sampler == "hf" and sharded:
        frozen["sampler_copy"] = (dtype_bytes * params, f"transformers sampler's whole copy, {dtype}")
    pack = pack_shape(cfg.data.chunk_tokens, cfg.data.horizon, cfg.rollout.max_thought_tokens,
                      cfg.rollout.group_size, cfg.train.micro_batch)
    acts = activation_bytes(shape, pack, cfg.data.chunk_tokens, checkpointing=cfg.model.gradient_checkpointing,
                            dtype=dtype, autocast=cfg.model.autocast_bf16,
                            bf16_module=module_dtype(cfg, backend) == "bfloat16",
                            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    buckets = zero_buckets(cfg, params, gpus)
    gpu_bytes = gpu_memory_gb * GB
    v = cfg.rollout.vllm
    engine = None
    if sampler in ("vllm", "auto"):  # auto: vLLM on a GPU machine (it is installed there)
        weight_dtype = dtype if v.dtype == "auto" else v.dtype
        weights = (2 if weight_dtype == "bfloat16" else 4) * params / v.tensor_parallel_size
        share = v.gpu_memory_utilization * gpu_bytes
        engine = {"bytes": share, "weights": weights, "kv_cache": share - weights, "dtype": weight_dtype,
                  "tensor_parallel_size": v.tensor_parallel_size, "sleep_level": v.sleep_level}
    state = per_param * params
    held = state + sum(b for b, _ in frozen.values())
    engine_bytes = engine["bytes"] if engine else 0.0
    train_phase = held + acts["total"] + buckets["total"] + (0.0 if engine and v.sleep_level else engine_bytes)
    sample_phase = held + engine_bytes
    peak = max(train_phase, sample_phase)
    problems = []
    if engine and engine["kv_cache"] <= 0:
        problems.append(f"the vLLM share ({engine['bytes'] / GB:.1f} GB) does not hold its weights "
                        f"({engine['weights'] / GB:.1f} GB): raise rollout.vllm.gpu_memory_utilization")
    if peak > gpu_bytes:
        problems.append(f"peak {peak / GB:.1f} GB > {gpu_memory_gb:g} GB")
    return {"gpus": gpus, "gpu_memory_gb": gpu_memory_gb, "backend": backend, "params": params,
            "state": {"bytes": state, "bytes_per_param": per_param, "layout": state_text},
            "frozen": {k: {"bytes": b, "what": w} for k, (b, w) in frozen.items()},
            "pack": pack, "activations": acts, "buckets": buckets, "vllm": engine, "sampler": sampler,
            "train_phase": train_phase, "sample_phase": sample_phase, "peak": peak,
            "fits": not problems, "problems": problems}


# ---- the report ---------------------------------------------------------------------------------


def plan(cfg: Config, shape: Shape, *, gpus: int = 8, gpu_memory_gb: float = 80.0) -> dict:
    """Everything `rntp plan` prints, as one JSON-ready dict."""
    flops = step_flops(cfg, shape)
    notes = []
    if not cfg.train.shared_prefix:
        notes.append("train.shared_prefix=false is not modelled: the figures are those of shared-prefix packs")
    if cfg.train.attention != "blocks":
        notes.append(f"train.attention={cfg.train.attention}: the K/V copies are the blocks path's (flex makes none; "
                     "dense adds a [W, W] mask and a masked kernel, not counted)")
    if resolved_backend(cfg, gpus) == "deepspeed" and cfg.model.autocast_bf16 and cfg.model.dtype == "float32":
        notes.append("DeepSpeed's bf16 mode casts the module to bf16 (model.dtype=float32 holds only for its fp32 "
                     "master weights): state, residual stream and activations counted in bf16")
    if cfg.rollout.sampler == "auto":
        notes.append("rollout.sampler=auto: counted as a colocated vLLM engine (what auto picks on GPUs)")
    return {"model": cfg.model.name_or_path, "notes": notes, "shape": asdict(shape), "params": shape.params(),
            "non_embedding_params": shape.non_embedding(),
            "step": {"positions": cfg.train.positions_per_step, "group_size": cfg.rollout.group_size,
                     "context": cfg.data.chunk_tokens, "thought": cfg.rollout.max_thought_tokens,
                     "horizon": cfg.data.horizon, "micro_batch": cfg.train.micro_batch, "epochs": cfg.grpo.epochs},
            "memory": memory_per_gpu(cfg, shape, gpus, gpu_memory_gb),
            "flops": flops, "flops_per_gpu": {k: v / gpus for k, v in flops.items() if not k.endswith("tokens")}}


def _row(label: str, text: str, value: str) -> str:
    return f"  {label:<15} {text:<78} {value:>9}"


def render(report: dict, source: str) -> str:
    """The readable table."""
    s, m, f, st = report["shape"], report["memory"], report["flops"], report["step"]
    n, acts, pack, gpu = m["gpus"], m["activations"], m["pack"], m["gpu_memory_gb"]
    gb = lambda x: f"{x / GB:.2f}"  # noqa: E731
    copies = pack["trunk_copies_per_position"]
    lines = [
        f"model   {report['model']} ({source})",
        f"        {report['params'] / 1e9:.3f} B params ({report['non_embedding_params'] / 1e9:.3f} B non-embedding): "
        f"{s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads / {s['kv_heads']} kv x {s['head_dim']}, "
        f"MLP {s['intermediate']}, vocab {s['vocab']}, {'tied' if s['tied'] else 'untied'} head",
        f"step    P={st['positions']} positions ({st['positions'] / n:g} per GPU), G={st['group_size']}, "
        f"C={st['context']}, T={st['thought']}, H={st['horizon']}, epochs {st['epochs']}",
        f"pack    {pack['trunks']} trunk(s) of C+H={pack['trunk_tokens']} + {pack['branches']} branches of "
        f"3+T+H={pack['branch_tokens']}: W={pack['tokens']} tokens (train.micro_batch={st['micro_batch']}; "
        f"{copies} trunk cop{'y' if copies == 1 else 'ies'} per position)",
        "",
        f"memory per GPU ({n} GPUs x {gpu:g} GB; GB = 1e9 bytes; estimates)" + " " * 44 + "GB",
        _row("training state", f"{m['state']['layout']} = {m['state']['bytes_per_param']:.2f} B/param",
             gb(m["state"]["bytes"])),
    ]
    for item in m["frozen"].values():
        lines.append(_row("frozen copy", item["what"], gb(item["bytes"])))
    ckpt = "layer_inputs" in acts
    lines.append(_row("activations", f"one micro-pass over W={acts['tokens']} tokens, "
                      f"{'gradient checkpointing' if ckpt else 'no gradient checkpointing'}:", gb(acts["total"])))
    per_token = f"{acts['layer_bytes_per_token']:,} B/token/layer (layer_activation_bytes)"
    if ckpt:
        lines.append(_row("", "  layer inputs: L x W x hidden x residual-stream bytes", gb(acts["layer_inputs"])))
        lines.append(_row("", f"  one layer recomputed: W x {per_token}", gb(acts["one_layer"])))
    else:
        lines.append(_row("", f"  all layers: L x W x {per_token}", gb(acts["layers"])))
    lines.append(_row("", f"  blocks attention K/V copies: branches x (C+3+T+H) x kv_dim x 2 x bytes"
                      f"{'' if ckpt else ' x L'}", gb(acts["attention_copies"])))
    lines.append(_row("", "  head: one chunk redone in backward, 3-9 fp32 [chunk x vocab] tensors",
                      gb(acts["logits"])))
    b = m["buckets"]
    if b["total"]:
        lines.append(_row("ZeRO-2 buckets", f"reduce bucket {b['elements']:.3g} elements + a flattened rank share "
                          "(all-gather: in place)", gb(b["total"])))
    e = m["vllm"]
    if e:
        lines.append(_row("vLLM engine", f"gpu_memory_utilization {e['bytes'] / gpu / GB:g} x {gpu:g} GB: weights "
                          f"{gb(e['weights'])} ({e['dtype']}, TP {e['tensor_parallel_size']}), KV cache "
                          f"{gb(e['kv_cache'])}", gb(e["bytes"])))
        if e["sleep_level"]:
            lines.append(_row("", f"  asleep while scoring and updating (sleep_level {e['sleep_level']})", ""))
    else:
        lines.append(_row("vLLM engine", f"none on the training GPUs (rollout.sampler={m['sampler']})", "0.00"))
    lines.append(_row("peak", f"score/update {gb(m['train_phase'])}, sampling {gb(m['sample_phase'])}",
                      gb(m["peak"])))
    if m["fits"]:
        lines.append(f"  => FITS on {n} x {gpu:g} GB ({gpu - m['peak'] / GB:.1f} GB left per GPU)")
    else:
        lines.append(f"  => DOES NOT FIT on {n} x {gpu:g} GB: " + "; ".join(m["problems"]))
    lines += ["", f"FLOPs per step (global; one GPU's share = / {n})"]
    rows = [("sampling", "sample", f"P x G x T = {f['sample_tokens']:,} tokens decoded x 2N (memory-bound)"),
            ("scoring", "score", f"one forward over {f['score_tokens']:,} packed tokens, head on reads, attention"),
            ("baseline", "baseline", "no-think forward of the EMA teacher / initial model, P x (C+H) tokens"),
            ("update", "update", f"{f['update_tokens']:,} tokens x (3 + checkpointing) forwards, head x 4"),
            ("reference", "reference", "KL reference: one forward of the update's packs per epoch"),
            ("position filter", "position_filter", "initial model over every chunk (entropy policy)")]
    for name, key, what in rows:
        if key in f:
            lines.append(_row(name, what, f"{f[key]:.3g}"))
    lines.append(_row("total", f"{f['total'] / n:.3g} per GPU", f"{f['total']:.3g}"))
    lines += [f"note: {note}" for note in report["notes"]]
    lines.append("not counted: CUDA context, NCCL buffers, allocator fragmentation, backward's transient tensors")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False)


def main(config: str | None, overrides: list[str], *, gpus: int, gpu_memory_gb: float, model_shape: str | None,
         as_json: bool) -> str:
    """What `rntp plan` prints; raises PlanError / ConfigError on bad input."""
    from rntp.config import load_config

    if gpus < 1:
        raise PlanError(f"--gpus must be at least 1, not {gpus}")
    if gpu_memory_gb <= 0:
        raise PlanError(f"--gpu-memory-gb must be positive, not {gpu_memory_gb:g}")
    cfg = load_config(config, overrides)
    shape, source = resolve_shape(cfg.model.name_or_path, model_shape)
    report = plan(cfg, shape, gpus=gpus, gpu_memory_gb=gpu_memory_gb)
    report["shape_source"] = source
    return to_json(report) if as_json else render(report, source)

