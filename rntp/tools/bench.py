"""`make bench`: throughput of each phase on a config, and the figures the design aims at.

Prints tokens/s of sampling, scoring and update, the share of step time spent scoring, the
sampler's throughput as a ratio of raw `LLM.generate` on the same requests, weight-push time
and peak memory, LoRA's step and push against full weights; with --server, what server mode costs
against the in-process engine (sampling over HTTP, weights over the gloo transfer). Figures only:
nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rntp.config import Config

os.environ.setdefault("WANDB_MODE", "disabled")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=5, help="training steps to time (the first is warm-up)")
    parser.add_argument("--sampler-repeats", type=int, default=4)
    parser.add_argument("--server", action="store_true", help="also time server mode against a local `rntp serve`")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from rntp.config import load_config
    from rntp.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"run_dir={tmp}/run", f"train.steps={args.steps}",
                                        "log.wandb_mode=disabled", "log.plot=false", "log.progress=false"])
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")][1:]  # drop warm-up
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    step = med("time/step")
    print(f"\n== training steps ({cfg.model.name_or_path}, {cfg.train.positions_per_step} positions x G="
          f"{cfg.rollout.group_size}, T={cfg.rollout.max_thought_tokens}, H={cfg.data.horizon}; median of "
          f"{len(rows)} steps after warm-up) ==")
    for phase in ("sample", "score", "update", "sync"):
        tps = f"{med(f'tokens_per_s/{phase}'):8.1f} tok/s" if f"tokens_per_s/{phase}" in rows[0] else " " * 14
        print(f"{phase:>8}: {med(f'time/{phase}'):6.2f} s  {tps}  {100 * med(f'time/{phase}') / step:5.1f}% of step")
    print(f"    step: {step:6.2f} s   whole run incl. start-up: {wall:.1f} s")
    print(f"scoring share of step time: {100 * med('time/score') / step:.1f}%  (aim < 15%)")
    print(f"peak memory: {max(r['memory/peak_gb'] for r in rows):.2f} GB")
    mismatch(args, cfg, rows, step)
    shared_prefix(cfg, args.steps)
    long_thoughts(cfg)
    sampler_ratio(cfg, args.sampler_repeats)
    seeded_requests(cfg, args.sampler_repeats)
    lora_cost(cfg, args.sampler_repeats)
    if args.server:
        server_cost(args.config, args.overrides, cfg, args.sampler_repeats)
        async_overlap(args.config, args.overrides, args.steps + 1)


def mismatch(args: argparse.Namespace, cfg: Config, rows: list[dict], step_s: float) -> None:
    """Sampler/trainer mismatch on this config with its own sampler dtype and with a bf16 sampler, and
    what the correction's arithmetic costs against the step."""
    import torch

    from rntp import grpo
    from rntp.config import load_config
    from rntp.train import train

    def show(label, rs):
        if not rs or "mismatch/mean_abs_log_ratio" not in rs[0]:
            print(f"mismatch ({label}): not reported by this sampler")
            return
        med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
        print(f"mismatch ({label}): mean |log ratio| {med('mismatch/mean_abs_log_ratio'):.2e}, max "
              f"{max(r['mismatch/max_abs_log_ratio'] for r in rs):.2e}, k3 KL {med('mismatch/kl_k3'):.2e}, IS weight "
              f"{med('mismatch/is_weight_mean'):.4f}, corrected {100 * med('mismatch/corrected_frac'):.2f}% of tokens")

    print(f"\n== sampler/trainer mismatch ({cfg.grpo.mismatch_correction}, C={cfg.grpo.is_cap}) ==")
    from rollout.vllm_utils import engine_dtype

    show(f"sampler {engine_dtype(cfg.model.dtype, cfg.rollout.vllm)}, trainer {cfg.model.dtype}", rows)
    if cfg.rollout.sampler != "hf":
        with tempfile.TemporaryDirectory() as tmp:
            bf16 = load_config(args.config, [*args.overrides, f"run_dir={tmp}/run", "train.steps=3",
                                             "rollout.vllm.dtype=bfloat16", "log.wandb_mode=disabled", "log.plot=false",
                                             "log.progress=false"])
            train(bf16)
            show(f"sampler bfloat16, trainer {cfg.model.dtype}",
                 [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")][1:])
    # The correction's cost: its weights over one step's thought tokens, timed alone.
    n, width = cfg.train.positions_per_step * cfg.rollout.group_size, cfg.rollout.max_thought_tokens + cfg.data.horizon
    log_ratio, mask = torch.randn(n, width) * 0.05, torch.rand(n, width) > 0.3
    grpo.importance_weights(log_ratio, mask, cfg.grpo.mismatch_correction, cfg.grpo.is_cap, cfg.grpo.is_band)
    t = time.perf_counter()
    for _ in range(100):
        grpo.importance_weights(log_ratio, mask, cfg.grpo.mismatch_correction, cfg.grpo.is_cap, cfg.grpo.is_band)
    cost = (time.perf_counter() - t) / 100 * cfg.grpo.epochs
    print(f"correction cost: {1e3 * cost:.3f} ms per step = {100 * cost / step_s:.3f}% of the step (aim < 2%)")


def shared_prefix(cfg: Config, repeats: int) -> None:
    """The update on one batch with each context computed once (shared-prefix packs) and once per
    thought, alternated on the same weights: time, tokens/s and peak memory, at the config's shapes
    and at a long-context shape (context 512, G=8, T=32)."""
    from rntp.models import load_policy
    from rntp.think_tokens import base_model_path

    path = base_model_path(cfg)
    policy = load_policy(path, cfg)
    shapes = [("config", cfg.data.chunk_tokens, cfg.rollout.group_size, cfg.rollout.max_thought_tokens,
               cfg.train.positions_per_step, cfg.train.micro_batch),
              ("long context", 640, 8, 32, 2, 8)]
    print("\n== update: shared prefix vs one context per thought (same batch, same weights) ==")
    for label, chunk, group, thought, positions, micro_batch in shapes:
        batch = synthetic_batch(policy.config.vocab_size, chunk, group, thought, cfg.data.horizon, positions)
        figures = {}
        for shared in [True, False] * max(1, repeats // 2):
            figures.setdefault(shared, []).append(time_update(policy, cfg, batch, shared, micro_batch))
        med = {k: (statistics.median(t for t, _, _ in v), max(m for _, m, _ in v), v[0][2]) for k, v in figures.items()}
        logical = batch["logical_tokens"]
        print(f"{label} (context ~{batch['mean_context']:.0f}, G={group}, T={thought}, H={cfg.data.horizon}, "
              f"{positions} positions, micro-batch {micro_batch}):")
        for shared in (True, False):
            t, mem, packed = med[shared]
            print(f"  {'shared  ' if shared else 'unshared'}: {t:6.2f} s  {logical / t:8.1f} tok/s  "
                  f"({packed} tokens forwarded)  peak +{mem:.2f} GB")
        print(f"  speed-up {med[False][0] / med[True][0]:.2f}x, memory {med[True][1] / max(med[False][1], 1e-9):.2f}x")


def synthetic_batch(vocab: int, chunk: int, group: int, thought: int, horizon: int, positions: int) -> dict:
    """Positions at the end of random chunks with G thoughts of full length each (the update's cost
    does not depend on what the thoughts say)."""
    import torch

    from rntp.forward.scoring import build_batch
    from rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    contexts, targets, rollouts = [], [], []
    for g in range(positions):
        ids = torch.randint(100, vocab, (chunk,), generator=gen).tolist()
        p = chunk - horizon - g * 7  # contexts of slightly different lengths
        contexts.append(ids[:p])
        targets.append(ids[p : p + horizon])
        for _ in range(group):
            sampled = torch.randint(100, vocab, (thought,), generator=gen).tolist()
            rollouts.append(Rollout(g, ids[:p] + [44, 17400, 46], sampled + [9617, 17400, 46], thought, False))
    logical = int(build_batch(rollouts, [targets[r.group] for r in rollouts], 0).attention_mask.sum())
    return {"contexts": contexts, "targets": targets, "rollouts": rollouts, "logical_tokens": logical,
            "mean_context": sum(map(len, contexts)) / len(contexts)}


def narrow_qwen3(vocab: int = 4096, layers: int = 4):
    """A random model of Qwen3's architecture (grouped-query attention, q/k norms), narrow enough that
    sequences of thousands of tokens train on 2 cores: 4 layers, width 256, 4 heads of 64, 2 KV heads.
    The small vocabulary keeps the output head's share of the work near a real model's (Qwen3-1.7B:
    head ~0.2x the body per read token; here ~0.3x), since both paths read the same tokens."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).float()


def long_thoughts(cfg: Config) -> None:
    """RLP-like lengths on a narrow model: the update and scoring of one position with G=8 thoughts of
    full length, by the three attention paths (structured blocks, the dense [W, W] mask, one context
    per thought), with attention FLOPs against the block-causal minimum; then micro-batch 2 against 8.
    One measurement each (a warm-up first): minutes, not a precise timing. Runs in a child process
    whose malloc returns every freed block of 64 KB or more to the system, so that resident memory
    (the CPU's peak-memory figure) follows live tensors rather than what earlier cases left cached."""
    import subprocess
    import sys

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        code = (f"from rntp.tools.bench import long_thoughts; from rntp.config import load_config; "
                f"long_thoughts(load_config(None, ['model.name_or_path={cfg.model.name_or_path}']))")
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
                       check=True)
        return
    from rntp.forward.packing import build_packs

    policy = narrow_qwen3()
    layers, heads, head_dim = policy.config.num_hidden_layers, 4, 64
    per_pair = 4 * layers * heads * head_dim  # QK^T and PV, forward, per (query, key) pair
    horizon, group = 32, 8
    print(f"\n== long thoughts: narrow Qwen3 ({layers} layers, width 256, GQA 4/2, vocab 4096), G={group}, "
          f"H={horizon}, one position, thoughts of full length ==")
    time_update(policy, cfg, long_batch(256, 64, group, horizon, policy.config.vocab_size), True, 8)  # warm-up
    for context, thought in ((1024, 1024), (2048, 512)):
        batch = long_batch(context, thought, group, horizon, policy.config.vocab_size)
        (_, pack), = build_packs(batch["contexts"], batch["rollouts"], batch["targets"], micro_batch=group,
                                 no_think=True)
        layout = pack.layout()
        minimum = per_pair * layout.pairs()
        print(f"C={context}, T={thought} (pack {layout.width} tokens wide; block-causal minimum "
              f"{minimum / 1e9:.2f} GFLOP of attention forward):")
        rows = {}
        for label, shared, attention in (("blocks", True, "blocks"), ("dense mask", True, "dense"),
                                         ("unshared", False, "blocks")):
            update_s, peak, tokens = time_update(policy, cfg, batch, shared, group, attention)
            t = time.perf_counter()
            score_once(policy, batch, shared, group, attention)
            score_s = time.perf_counter() - t
            counted = attention_flops(policy, batch, shared, group, attention)
            rows[label] = update_s, peak
            print(f"  {label:>10}: update {update_s:6.2f} s  scoring {score_s:5.2f} s  peak +{peak:5.2f} GB  "
                  f"{tokens} tokens  attention {counted / 1e9:7.2f} GFLOP counted = {counted / minimum:.2f}x minimum")
        print(f"  blocks / unshared: update {rows['blocks'][0] / rows['unshared'][0]:.2f}x time, "
              f"{rows['blocks'][1] / max(rows['unshared'][1], 1e-9):.2f}x memory; blocks / dense: "
              f"{rows['blocks'][0] / rows['dense mask'][0]:.2f}x time, "
              f"{rows['blocks'][1] / max(rows['dense mask'][1], 1e-9):.2f}x memory")
        print(f"  (with tile-skipping causal kernels, as on GPUs, the blocks path computes "
              f"{layout.computed_pairs() / layout.pairs():.2f}x the minimum)")
    batch = long_batch(1024, 1024, group, horizon, policy.config.vocab_size)
    peaks = {mb: time_update(policy, cfg, batch, True, mb)[1] for mb in (8, 2)}
    print(f"micro-batch 2 vs 8 at C=1024, T=1024 (blocks): peak +{peaks[2]:.2f} GB vs +{peaks[8]:.2f} GB "
          f"({peaks[2] / max(peaks[8], 1e-9):.2f}x)")


def long_batch(context: int, thought: int, group: int, horizon: int, vocab: int) -> dict:
    """One position after `context` random tokens, `group` thoughts of exactly `thought` sampled tokens
    (the close tag appended: truncated), ids that exist in `vocab`."""
    import torch

    from rollout import Rollout

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (context + horizon,), generator=gen).tolist()
    rollouts = [Rollout(0, ids[:context] + [3], torch.randint(10, vocab, (thought,), generator=gen).tolist() + [4],
                        thought, False) for _ in range(group)]
    return {"contexts": [ids[:context]], "targets": [ids[context:]], "rollouts": rollouts}


def score_once(policy, batch: dict, shared: bool, micro_batch: int, attention: str) -> None:
    from rntp.forward.scoring import score_groups

    score_groups(policy.eval(), batch["contexts"], batch["rollouts"], batch["targets"], pad_id=0,
                 micro_batch=micro_batch, shared=shared, attention=attention)
    policy.train()


def attention_flops(policy, batch: dict, shared: bool, micro_batch: int, attention: str) -> int:
    """Attention FLOPs of one scoring forward, counted by `torch.utils.flop_counter` with SDPA's math
    kernel (its CPU flash kernel has no FLOP formula): every (query, key) pair in the tensors
    multiplied, masked or not, which is what a kernel without tile skipping executes."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from rntp.forward.packing import build_packs, packed_logprobs

    packs = build_packs(batch["contexts"], batch["rollouts"], batch["targets"], micro_batch=micro_batch,
                        shared=shared, no_think=True)
    with torch.no_grad():
        packed_logprobs(policy, packs[0][1], attention=attention)  # causal biases made outside the counter
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            for _, pack in packs:
                packed_logprobs(policy, pack, attention=attention)
    # attention alone: the products of [.., q, d] x [.., d, k] and [.., q, k] x [.., k, d]; the model's
    # linear layers are 2-D matmuls and the head runs on read tokens, so 4-D batched products are attention
    return sum(f for op, f in counter.get_flop_counts()["Global"].items() if "bmm" in str(op))


def time_update(policy, cfg, batch: dict, shared: bool, micro_batch: int, attention: str = "blocks",
                autocast: bool = False) -> tuple[float, float, int]:
    """One optimizer step of the update on `batch`: seconds, peak memory above the start (GB), and
    tokens forwarded. The weights are restored afterwards, so every call sees the same model. `cfg`
    (None: the defaults) names the model; `autocast` runs it under bf16 autocast."""
    import copy

    import torch

    from rntp.config import load_config
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.forward.scoring import score_groups
    from rntp.train import update_policy

    named = [f"model.name_or_path={cfg.model.name_or_path}"] if cfg is not None else []
    run = load_config(None, [*named, f"train.micro_batch={micro_batch}", f"train.shared_prefix={str(shared).lower()}",
                             "optim.lr=1e-6", f"train.attention={attention}",
                             f"model.autocast_bf16={str(autocast).lower()}"])
    saved = copy.deepcopy(policy.state_dict())
    scored = score_groups(policy.eval(), batch["contexts"], batch["rollouts"], batch["targets"], pad_id=0,
                          micro_batch=micro_batch, shared=shared, attention=attention, autocast=autocast)
    advantages = torch.randn(len(batch["rollouts"]), generator=torch.Generator().manual_seed(1))
    engine = make_engine(policy.train(), run, DistInfo(device=next(policy.parameters()).device), 1, total_steps=1)
    keep = torch.ones(len(batch["rollouts"]), dtype=torch.bool)
    with PeakMemory() as memory:
        t = time.perf_counter()
        out = update_policy(engine, ref=None, contexts=batch["contexts"], rollouts=batch["rollouts"],
                            targets=batch["targets"], scored=scored, advantages=advantages, keep=keep, cfg=run)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    policy.load_state_dict(saved)
    del engine, saved, scored
    return seconds, memory.peak_gb, out["update/packed_tokens"]


class PeakMemory:
    """Peak memory above the level at entry: allocated GPU memory, or resident memory on CPU
    (sampled every 5 ms from /proc, since the process's own peak cannot be reset)."""

    def __enter__(self):
        import threading

        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_gb = (torch.cuda.max_memory_allocated() - self.start) / 2**30
        else:
            self.done.set()
            self.thread.join()
            self.peak_gb = (max(self.peak, self._rss()) - self.start) / 2**30


def vllm_engine(cfg: Config, positions: int, section: str):
    """An in-process vLLM engine on the config's model and the prompts of its first `positions`
    positions; (None, None) with a line saying `section` is skipped where vLLM is not in use."""
    from transformers import AutoTokenizer

    from rntp.data import PositionStream
    from rntp.think_tokens import base_model_path
    from rollout import ThinkTags, make_sampler
    from rollout.vllm_utils import vllm_available

    if cfg.rollout.sampler == "hf" or not vllm_available():
        print(f"{section}: skipped (vLLM not in use)")
        return None, None
    path = base_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    sampler = make_sampler("vllm", path, tags, dtype=cfg.model.dtype, max_model_len=cfg.data.chunk_tokens +
                           cfg.rollout.max_thought_tokens + 16, vllm_cfg=cfg.rollout.vllm)
    return sampler, [tags.prompt(p.context) for p in PositionStream(cfg.data, tokenizer).take(positions)]


def sampler_ratio(cfg: Config, repeats: int) -> None:
    """Our sampler vs raw `LLM.generate` on identical requests, on one engine, interleaved."""
    from rollout import SamplingSpec

    sampler, prompts = vllm_engine(cfg, cfg.train.positions_per_step, "sampler ratio")
    if sampler is None:
        return
    spec = SamplingSpec(cfg.rollout.group_size, cfg.rollout.max_thought_tokens, cfg.rollout.temperature,
                        cfg.rollout.top_p, seed=1)
    inputs, params = sampler.requests(prompts, spec)
    sampler.llm.generate(inputs, params, use_tqdm=False)  # warm-up
    def timed(fn):
        sampler.llm.reset_prefix_cache()  # in training every prompt is new: no cache hits for either side
        t = time.perf_counter()
        result = fn()
        return time.perf_counter() - t, result

    ours, raw = [], []
    for i in range(repeats):  # alternate the order so neither side always runs second
        calls = [("ours", lambda: sampler.sample(prompts, spec)),
                 ("raw", lambda: sampler.llm.generate(inputs, params, use_tqdm=False))]
        for name, fn in calls if i % 2 == 0 else calls[::-1]:
            seconds, result = timed(fn)
            (ours if name == "ours" else raw).append(seconds)
            if name == "raw":
                outs = result
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    print(f"sampler: {tokens / statistics.median(ours):.1f} tok/s ours vs {tokens / statistics.median(raw):.1f} tok/s "
          f"raw LLM.generate -> ratio {statistics.median(raw) / statistics.median(ours):.3f}  (aim > 0.85)")
    sampler.close()


def seeded_requests(cfg: Config, repeats: int) -> None:
    """vLLM sampling with a seed on every request (`rollout.seed_requests=true`) against none, on the
    same engine and prompts, alternated. vLLM draws seeded requests' noise one request at a time at
    every decode step; the unseeded draw is one batched call (FlashInfer's sampler is not used in either
    case: RNTP's engines ask for processed log-probs)."""
    from dataclasses import replace


    from rollout import SamplingSpec

    sampler, prompts = vllm_engine(cfg, 8, "seeded requests")
    if sampler is None:
        return
    seeded = SamplingSpec(16, cfg.rollout.max_thought_tokens, cfg.rollout.temperature, cfg.rollout.top_p, seed=1)
    times: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    sampler.sample(prompts, seeded)  # warm-up
    for i in range(max(2, repeats)):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            sampler.llm.reset_prefix_cache()
            t = time.perf_counter()
            rollouts = sampler.sample(prompts, replace(seeded, seeded=flag, seed=1 + i))
            times[flag].append(time.perf_counter() - t)
            tokens[flag] = sum(r.n_sampled for r in rollouts)
    rate = {flag: tokens[flag] / statistics.median(v) for flag, v in times.items()}
    print(f"seeded requests (8 prompts x 16 thoughts): {rate[True]:.1f} tok/s seeded vs {rate[False]:.1f} tok/s "
          f"unseeded -> ratio {rate[True] / rate[False]:.3f}")
    sampler.close()


def local_server(config: str | None, overrides: list[str], log=None):
    """`rntp serve` on a free loopback port (gloo weight transfer): the process and its URL."""
    import subprocess
    import sys

    from rollout.net import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rntp", "serve", "--host", "127.0.0.1", "--port", str(port),
                             *(["--config", config] if config else []), *overrides,
                             "rollout.server.weight_transfer=gloo"],
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def async_overlap(config: str | None, overrides: list[str], steps: int = 6) -> None:
    """The training loop against one local server (started here; its log in a temporary file),
    synchronous (max_staleness 0) and one step off-policy (1): median step time and phases, the
    trainer's wait for batches, the sampler's idle time and the mismatch per step (after the first)."""
    from rntp.config import load_config
    from rntp.train import train

    print("\n== asynchronous rollouts (server mode, one server, same seeds) ==")
    log = tempfile.NamedTemporaryFile("w+", suffix="-server.log", delete=False)
    server, url = local_server(config, overrides, log)
    figures = {}
    try:
        for lag in (0, 1):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = load_config(config, [*overrides, f"run_dir={tmp}/run", f"train.steps={steps}",
                                           "rollout.sampler=server", f"rollout.server.urls=[{url}]",
                                           "rollout.server.weight_transfer=gloo", f"rollout.max_staleness={lag}",
                                           "eval.every=0", "log.wandb_mode=disabled", "log.plot=false",
                                           "log.progress=false"])
                train(cfg)
                rows = [json.loads(line) for line in open(f"{tmp}/run/metrics.jsonl")][1:]
            med = {key: statistics.median(r.get(key, 0.0) for r in rows) for key in rows[0]}
            figures[lag] = med["time/step"]
            phases = "  ".join(f"{p} {med[f'time/{p}']:.2f}" for p in ("sample", "score", "update", "sync"))
            print(f"max_staleness={lag}: step {med['time/step']:.2f} s ({phases})" + (
                f"; trainer waited {med['async/trainer_idle_s']:.2f} s, sampler idle "
                f"{med['async/sampler_idle_s']:.2f} s" if lag else ""))
            print(f"  mismatch: mean |log ratio| {med['mismatch/mean_abs_log_ratio']:.2e}, k3 KL "
                  f"{med['mismatch/kl_k3']:.2e}, IS weight {med['mismatch/is_weight_mean']:.4f}, corrected "
                  f"{100 * med['mismatch/corrected_frac']:.2f}% of thought tokens")
    finally:
        server.terminate()
        server.wait(60)
    print(f"step time, one step off-policy / synchronous: {figures[1] / figures[0]:.2f}x  (server log: {log.name})")


def lora_cost(cfg: Config, repeats: int) -> None:
    """LoRA (`model.lora`, its defaults) against full weights on the config's model and shapes: one step's
    sampling, scoring, update and push (the weights into an in-process vLLM engine: `reload_weights` of every
    weight, or the adapter reloaded in place), each phase alternated between the two in every round so that
    a busy machine slows both alike; medians after a warm-up round, and the bytes a push moves."""
    from transformers import AutoTokenizer

    import torch

    from rntp.data import PositionStream
    from rntp.distributed import DistInfo
    from rntp.engines import make_engine
    from rntp.models import load_trainable
    from rntp.forward.packing import packs_per_step
    from rntp.forward.scoring import score_groups
    from rntp.think_tokens import base_model_path
    from rntp.train import update_policy
    from rollout import SamplingSpec, ThinkTags, make_sampler
    from rollout.spans import pad_id_of
    from rollout.vllm_utils import vllm_available

    if cfg.rollout.sampler == "hf" or not vllm_available():
        print("LoRA against full weights: skipped (vLLM not in use)")
        return
    path = base_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
    positions = PositionStream(cfg.data, tokenizer).take(cfg.train.positions_per_step)
    prompts = [tags.prompt(p.context) for p in positions]
    contexts, targets = [p.context for p in positions], [p.target for p in positions]
    passes = packs_per_step(len(positions), cfg.rollout.group_size, cfg.train.micro_batch)
    max_len = cfg.data.chunk_tokens + cfg.rollout.max_thought_tokens + 16
    sides = {}
    for name in ("full", "lora"):
        run = cfg.model_copy(deep=True)
        run.model.lora.enabled = name == "lora"
        torch.manual_seed(0)
        engine = make_engine(load_trainable(path, run, DistInfo(0, 1), passes), run, DistInfo(0, 1), passes, 10**6)
        sampler = make_sampler("vllm", path, tags, dtype=cfg.model.dtype, max_model_len=max_len,
                               vllm_cfg=cfg.rollout.vllm, lora_rank=run.model.lora.rank if name == "lora" else None)
        stream = engine.weights(cfg.dist.weight_bucket_mb)
        sampler.push_weights(stream)
        sides[name] = {"run": run, "engine": engine, "sampler": sampler, "times": {},
                       "mb": sum(t.numel() * t.element_size() for _, t in stream.tensors()) / 2**20}

    def phases(side, round_):
        run, engine, sampler = side["run"], side["engine"], side["sampler"]
        spec = SamplingSpec(cfg.rollout.group_size, cfg.rollout.max_thought_tokens, cfg.rollout.temperature,
                            cfg.rollout.top_p, seed=round_)
        rollouts = sampler.sample(prompts, spec)
        yield "sample"
        engine.train(False)
        scored = score_groups(engine.model, contexts, rollouts, targets, pad_id=pad_id_of(tokenizer),
                              micro_batch=cfg.train.micro_batch,
                              autocast=cfg.model.autocast_bf16, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, attention=cfg.train.attention)
        engine.train(True)
        yield "score"
        advantages = torch.randn(len(rollouts), generator=torch.Generator().manual_seed(round_))
        update_policy(engine, ref=None, contexts=contexts, rollouts=rollouts, targets=targets, scored=scored,
                      advantages=advantages, keep=torch.ones(len(rollouts), dtype=torch.bool), cfg=run)
        yield "update"
        sampler.push_weights(engine.weights(cfg.dist.weight_bucket_mb))
        yield "push"

    for round_ in range(repeats + 1):  # round 0 warms up
        order = ("full", "lora") if round_ % 2 == 0 else ("lora", "full")
        runs = {name: phases(sides[name], round_) for name in order}
        for _ in range(4):  # phase by phase, the two sides back to back
            for name in order:
                t = time.perf_counter()
                phase = next(runs[name])
                if round_:
                    sides[name]["times"].setdefault(phase, []).append(time.perf_counter() - t)
    lora_cfg = sides["lora"]["run"].model.lora
    print(f"\n== LoRA against full weights (rank {lora_cfg.rank}, alpha {lora_cfg.alpha}, {lora_cfg.target_modules}; "
          f"{len(positions)} positions x G={cfg.rollout.group_size}, T={cfg.rollout.max_thought_tokens}; median of "
          f"{repeats} alternated rounds) ==")
    med = {name: {k: statistics.median(v) for k, v in side["times"].items()} for name, side in sides.items()}
    for phase in ("sample", "score", "update", "push"):
        full, lora = med["full"][phase], med["lora"][phase]
        print(f"{phase:>8}: full {full:6.3f} s   lora {lora:6.3f} s   ({lora / full:.2f}x)")
    step = {name: sum(m.values()) for name, m in med.items()}
    print(f"    step: full {step['full']:6.3f} s   lora {step['lora']:6.3f} s   ({step['lora'] / step['full']:.2f}x)")
    print(f"  pushed: full {sides['full']['mb']:.1f} MB (every weight)   lora {sides['lora']['mb']:.2f} MB "
          "(the adapter)")
    for side in sides.values():
        side["sampler"].close()


def server_cost(config: str, overrides: list[str], cfg: Config, repeats: int) -> None:
    """Server mode vs the in-process engine, same model, same requests: sampling throughput ratio
    and the time to push the full weights (gloo transfer vs in-process reload)."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rntp.config import load_config
    from rntp.data import PositionStream
    from rntp.think_tokens import base_model_path
    from rollout import SamplingSpec, ThinkTags, make_sampler
    from rollout.base import WeightStream

    server, url = local_server(config, overrides)
    try:
        t0 = time.perf_counter()
        server_cfg = load_config(None, ["rollout.sampler=server", f"rollout.server.urls=[{url}]",
                                        "rollout.server.weight_transfer=gloo"]).rollout.server
        path = base_model_path(cfg)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tags = ThinkTags(tokenizer, cfg.rollout.open_tag, cfg.rollout.close_tag)
        remote = make_sampler("server", path, tags, server_cfg=server_cfg)  # waits for the server
        started = time.perf_counter() - t0
        local = make_sampler("vllm", path, tags, dtype=cfg.model.dtype, max_model_len=cfg.data.chunk_tokens +
                             cfg.rollout.max_thought_tokens + 16, vllm_cfg=cfg.rollout.vllm)
        positions = PositionStream(cfg.data, tokenizer).take(cfg.train.positions_per_step)
        prompts = [tags.prompt(p.context) for p in positions]
        spec = SamplingSpec(cfg.rollout.group_size, cfg.rollout.max_thought_tokens, cfg.rollout.temperature,
                            cfg.rollout.top_p, seed=1)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        weights = WeightStream.of_module(model)
        remote.push_weights(weights)  # the first push also opens the transfer group
        times = {"remote": [], "local": [], "push_remote": [], "push_local": []}
        tokens = 0
        for i in range(repeats):
            for name, sampler in ((("remote", remote), ("local", local)) if i % 2 == 0 else
                                  (("local", local), ("remote", remote))):
                t = time.perf_counter()
                rollouts = sampler.sample(prompts, spec)
                times[name].append(time.perf_counter() - t)
                tokens = sum(r.n_sampled for r in rollouts)
                t = time.perf_counter()
                sampler.push_weights(weights)  # also resets the prefix cache: every round starts cold
                times[f"push_{name}"].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        size_mb = sum(p.numel() * p.element_size() for _, p in weights.tensors()) / 2**20
        print(f"\n== server mode (local `rntp serve`, gloo weight transfer; up in {started:.0f} s) ==")
        print(f"sampling: {tokens / med['remote']:.1f} tok/s over HTTP vs {tokens / med['local']:.1f} tok/s in-process "
              f"-> ratio {med['local'] / med['remote']:.3f}")
        print(f"weight push ({size_mb:.0f} MB): {med['push_remote']:.2f} s to the server vs "
              f"{med['push_local']:.2f} s in-process ({size_mb / med['push_remote']:.0f} MB/s over gloo)")
        remote.close()
        local.close()
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
