"""`make gpu-check`: RNTP's training loop on GPUs at real model shapes, with nothing downloaded.

For a bare GPU machine (CUDA and PyTorch, no internet, no model weights): it builds randomly
initialised models from the configs of real models (by default Qwen3-1.7B, the RLP recipe's model,
at the recipe's shapes: contexts of 2048, G=16, thoughts of 2048, H=1), a tokenizer trained on
generated text and a generated corpus, then runs the real `train()` loop (fp32 master weights, bf16
autocast, a bf16 vLLM engine where vLLM is installed, else the transformers sampler) and prints per
phase: tokens/s, share of the step, the update's FLOP/s and model FLOP utilisation (MFU) from the
FLOPs it executed (its packs' tokens, read tokens and attention pairs, by `rntp.plan.forward_flops`,
attention included), the weight-push time and peak GPU memory against `rntp plan`'s estimate. Where
there are several GPUs it also runs a torchrun step on all of them with FSDP2 and (if installed)
DeepSpeed ZeRO-3, with the same sampler (colocated vLLM under torchrun where installed). Random
weights write random thoughts that never close, so every thought runs to its budget: the figures
are about speed and memory at full length, not learning. Nothing here asserts a speed.

    python -m rntp.gpu_check [--shapes qwen3-1.7b,qwen2.5-0.5b] [--steps 3] [--out gpu-check]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Architectures of real models (their config.json values), built with random weights.
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
# Qwen/Qwen3-8B's config.json (their sources are cited in rntp.plan.builtin_shapes).
QWEN3_SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
# Dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity); --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
WORDS = ("the model reads text and writes a short thought before it predicts what comes next in the "
         "document each value returned by a function is checked against the list of names in the module "
         "when the file opens the first line holds the header then every line after it holds one record").split()


def generated_corpus(path: Path, docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                         for _ in range(rng.randint(40, 80))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def trained_tokenizer(corpus: Path, out: Path):
    """A byte-level BPE trained on the generated corpus, with the think tags as ordinary text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in open(corpus)]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["<think> </think>"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def random_model(shape: str, out: Path, tokenizer) -> int:
    """A Qwen2- or Qwen3-architecture model of `shape` with random weights, saved in float32; its size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if shape in QWEN3_SHAPES else (Qwen2Config,
                                                                                           Qwen2ForCausalLM)
    config = config_cls(**(QWEN3_SHAPES.get(shape) or SHAPES[shape]), max_position_embeddings=8192,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = model_cls(config)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def run_config(model_dir: Path, corpus: Path, run_dir: Path, args, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.source={corpus}", f"run_dir={run_dir}",
            "model.dtype=float32", f"model.autocast_bf16={str(args.device == 'cuda').lower()}",
            "model.gradient_checkpointing=true", f"data.chunk_tokens={args.context}", "data.min_context=64",
            f"data.horizon={args.horizon}", f"rollout.group_size={args.group}",
            f"rollout.max_thought_tokens={args.thought}", "rollout.vllm.dtype=bfloat16",
            "rollout.vllm.enforce_eager=false", f"reward.name={args.reward}", f"reward.baseline={args.baseline}",
            f"train.positions_per_step={args.positions}", f"train.micro_batch={args.micro_batch}",
            f"train.steps={args.steps}", "rollout.check_sync_every=0", "optim.lr=1e-6",
            "rollout.tag_tokens=text",  # random weights: a tagged copy (GBs at these shapes) would measure nothing
            "log.wandb_mode=disabled", "log.plot=false", "log.progress=false", *extra]


def update_flops(row: dict, shape, checkpointing: bool) -> float:
    """FLOPs one GPU's update executed in a step (the metrics are per rank): its packs' forward, the
    backward (2 forwards), the recompute of gradient checkpointing (1), and the output head's
    forward once more in backward (`ChunkedLogProbs` recomputes it); attention by the pairs the packs
    hold (`PackLayout.pairs`: a tile-skipping kernel's work, the blocks and flex paths' up to padding)."""
    from rntp.plan import forward_flops

    body = forward_flops(shape, int(row["update/packed_tokens"]), 0, int(row["update/attention_pairs"]))
    head = forward_flops(shape, 0, int(row["update/read_tokens"]), 0)
    return (3 + checkpointing) * body + 4 * head


def one_process(model_dir: Path, corpus: Path, run_dir: Path, shape_name: str, args) -> dict:
    from transformers import AutoConfig

    from rntp.config import load_config
    from rntp.plan import memory_per_gpu, shape_from_config
    from rntp.train import train

    cfg = load_config(None, run_config(model_dir, corpus, run_dir, args, f"rollout.sampler={args.sampler}"))
    shape = shape_from_config(AutoConfig.from_pretrained(model_dir))
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1:] or \
        [json.loads(line) for line in open(run_dir / "metrics.jsonl")]  # drop the warm-up step
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    flops = statistics.median(update_flops(r, shape, cfg.model.gradient_checkpointing) / r["time/update"]
                              for r in rows)
    planned = memory_per_gpu(cfg, shape, gpus=1, gpu_memory_gb=args.gpu_memory_gb)
    return {"wall_s": wall, "step_s": med("time/step"), "peak_gb": max(r["memory/peak_gb"] for r in rows),
            "planned_peak_gb": planned["peak"] / 1e9, "planned_train_phase_gb": planned["train_phase"] / 1e9,
            **{f"{phase}_s": med(f"time/{phase}") for phase in ("sample", "score", "update", "sync")},
            **{f"{phase}_tok_s": med(f"tokens_per_s/{phase}") for phase in ("sample", "score", "update")},
            "update_tflops": flops / 1e12,
            "update_mfu": flops / (args.peak_tflops * 1e12) if args.peak_tflops else None}


def multi_gpu(model_dir: Path, corpus: Path, out: Path, args, backend: list[str], nproc: int) -> dict:
    run_dir = out / f"run-{'-'.join(b.split('=')[1] for b in backend)}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "rntp",
           "train", *run_config(model_dir, corpus, run_dir, args, f"rollout.sampler={args.sampler}", *backend,
                                f"train.positions_per_step={args.positions * nproc}", "train.steps=2")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    result = {"backend": " ".join(backend), "ranks": nproc, "ok": done.returncode == 0,
              "wall_s": time.perf_counter() - t0}
    if done.returncode != 0:
        result["error"] = done.stderr[-2000:]
        return result
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    result.update(step_s=rows[-1]["time/step"], grad_norm=rows[-1]["optim/grad_norm"],
                  peak_gb=rows[-1]["memory/peak_gb"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen3-1.7b")
    parser.add_argument("--steps", type=int, default=3, help="training steps per shape (the first is warm-up)")
    parser.add_argument("--context", type=int, default=2048, help="data.chunk_tokens (RLP: 2048)")
    parser.add_argument("--thought", type=int, default=2048, help="rollout.max_thought_tokens (RLP: 2048)")
    parser.add_argument("--group", type=int, default=16, help="rollout.group_size (RLP: 16)")
    parser.add_argument("--horizon", type=int, default=1, help="data.horizon (RLP scores the next token)")
    parser.add_argument("--reward", default="info_gain")
    parser.add_argument("--baseline", default="ema", help="reward.baseline (RLP: an EMA teacher)")
    parser.add_argument("--positions", type=int, default=1, help="positions per step per GPU")
    parser.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch (thoughts per pack)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, help="for rntp plan's estimate")
    parser.add_argument("--sampler", default="auto", help="auto: vLLM where installed, else transformers")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one GPU")
    parser.add_argument("--out", default="gpu-check")
    args = parser.parse_args(argv)

    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    if args.peak_tflops is None:
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    gpus = torch.cuda.device_count()
    if args.gpu_memory_gb is None:
        args.gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if gpus else 24.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"== gpu-check: {name} x{gpus}, torch {torch.__version__}, peak {args.peak_tflops} TFLOP/s bf16 ==")
    corpus = generated_corpus(out / "corpus.jsonl")
    report = {"device": name, "gpus": gpus, "torch": torch.__version__, "shapes": {}, "multi_gpu": []}
    for shape in args.shapes.split(","):
        model_dir = out / shape
        tokenizer = trained_tokenizer(corpus, model_dir)
        n_params = random_model(shape, model_dir, tokenizer)
        result = one_process(model_dir, corpus, out / f"run-{shape}", shape, args)
        report["shapes"][shape] = {"params": n_params, **result}
        print(f"\n{shape} ({n_params / 1e9:.2f} B params; context {args.context}, G={args.group}, "
              f"T={args.thought}, {args.positions} positions/step)")
        for phase in ("sample", "score", "update", "sync"):
            tok = result.get(f"{phase}_tok_s")
            print(f"  {phase:>6}: {result[f'{phase}_s']:7.2f} s  {100 * result[f'{phase}_s'] / result['step_s']:5.1f}%"
                  + (f"  {tok:10.0f} tok/s" if tok is not None else "  (weight push)"))
        mfu = result["update_mfu"]
        print(f"  step {result['step_s']:.2f} s, update {result['update_tflops']:.1f} TFLOP/s executed"
              + (f" = {100 * mfu:.1f}% MFU" if mfu is not None else "") + f", peak {result['peak_gb']:.1f} GB "
              f"(rntp plan: {result['planned_peak_gb']:.1f} GB, {result['planned_train_phase_gb']:.1f} GB while "
              "training)")
        if gpus >= 2:
            from importlib.util import find_spec

            backends = [["dist.backend=fsdp2"]]
            if find_spec("deepspeed"):
                backends.append(["dist.backend=deepspeed", "dist.zero_stage=3"])
            for backend in backends:
                multi = multi_gpu(model_dir, corpus, out, args, backend, min(gpus, 8))
                report["multi_gpu"].append({"shape": shape, **multi})
                print(f"  torchrun x{multi['ranks']} {multi['backend']}: "
                      + (f"step {multi['step_s']:.2f} s, grad norm {multi['grad_norm']:.3g}, peak "
                         f"{multi['peak_gb']:.1f} GB" if multi["ok"] else "FAILED\n" + multi["error"]))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport: {out / 'report.json'}")


if __name__ == "__main__":
    main()
