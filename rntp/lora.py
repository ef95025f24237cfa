"""LoRA adapters (PEFT) in place of full weights (`model.lora`).

The policy is a `peft.PeftModel` around the frozen base: only the adapter (`lora_A`, `lora_B` of each
targeted linear layer) has gradients and optimizer state, and only the adapter goes to the sampler
(vLLM serves it on the base it holds once; `rollout/vllm_sampler.py`, `rollout/server.py`) and into
checkpoints (PEFT's own format: `adapter_config.json`, `adapter_model.safetensors`).

The frozen models come from the same base weights, never from a second full copy:

- `BaseView`: the base with the adapter switched off. It is the initial policy exactly (PEFT starts
  `lora_B` at zero), so it serves the KL reference, the `initial` reward baseline and the entropy
  position filter, after a resume too.
- `AdapterEMA`: the EMA teacher. "EMA of the policy" with a frozen base is the base plus an EMA of the
  adapter: each step the teacher's copy of every adapter tensor moves `1 - reward.ema_decay` of the way
  towards the policy's (the same `follow` as full weights, over the pushed adapter tensors), and its
  forward runs the shared base with those tensors in place of the policy's (`torch.func.functional_call`).
  What that is, precisely: an EMA of A and of B separately, so the teacher's update is
  EMA(B) . EMA(A), not EMA(B . A) (the two differ by the EMA-covariance of the factors' fluctuations);
  it follows the policy as RLP's teacher does, at adapter cost. The base with the adapter off would be
  the frozen initial model, which is `reward.baseline=initial`, not an EMA.

Names: the policy's parameters are `base_model.model.<module>.lora_A.default.weight`; the sampler and
checkpoints get PEFT's on-disk names (`...lora_A.weight`, `peft_key`), the same that
`peft.get_peft_model_state_dict` writes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch

from rollout.adapter import CONFIG_FILE, WEIGHTS_FILE

ADAPTER = "default"  # PEFT's name for the one adapter RNTP trains


def is_peft(model) -> bool:
    """Whether `model` (possibly wrapped by DDP or DeepSpeed) is a PEFT model."""
    try:
        from peft import PeftModel
    except ImportError:  # a bare GPU machine without peft trains full weights
        return False

    return isinstance(getattr(model, "module", model), PeftModel)


def is_adapter_folder(path) -> bool:
    """A checkpoint (or any folder) that holds a PEFT adapter rather than a whole model."""
    return (Path(path) / CONFIG_FILE).is_file()


def check_resume(resume_dir, enabled: bool) -> None:
    """A LoRA checkpoint resumes only with `model.lora` on, a whole-model one only with it off."""
    if resume_dir is None or is_adapter_folder(resume_dir) == enabled:
        return
    if enabled:
        raise ValueError(f"{resume_dir} holds a whole model, not a LoRA adapter; resume it with "
                         "model.lora.enabled=false")
    raise ValueError(f"{resume_dir} holds a LoRA adapter; resume it with model.lora.enabled=true and its settings")


def peft_key(name: str) -> str:
    """A parameter's name in PEFT's saved format (the adapter's name dropped, as PEFT saves it)."""
    return name.replace(f".{ADAPTER}.", ".")


def wrap(model, lora_cfg, base_path: str | None = None):
    """`model` with a fresh LoRA adapter (`model.lora`); only the adapter is trainable. Refuses
    targets that vLLM could not serve (embeddings, the output head)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_cfg.target_modules, bias="none", task_type="CAUSAL_LM")
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    peft_model = get_peft_model(model, config)
    if base_path is not None:  # what `rntp export` and vLLM find the base by
        peft_model.peft_config[ADAPTER].base_model_name_or_path = str(base_path)
    inner = peft_model.base_model.model
    for name, module in inner.named_modules():
        if hasattr(module, "lora_A") and getattr(module, "base_layer", None) in (head, embed):
            raise ValueError(f"model.lora.target_modules reaches {name} (the embeddings or output head), where "
                             "vLLM serves no adapter; name the linear layers instead (e.g. q_proj, v_proj)")
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"model.lora.target_modules={lora_cfg.target_modules} matches no layer of "
                         f"{type(inner).__name__}")
    return peft_model


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's parameters under PEFT's saved names, in the model's order."""
    model = getattr(model, "module", model)
    return [(peft_key(n), p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_config(model) -> dict:
    """adapter_config.json's contents for the trained adapter, as PEFT writes them (inference mode on)."""
    model = getattr(model, "module", model)
    config = model.peft_config[ADAPTER].to_dict()
    config["inference_mode"] = True
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def load_adapter_weights(model, folder) -> None:
    """Copy a saved adapter (a checkpoint's) into `model`'s adapter: every tensor must find its
    parameter with the same shape, and every adapter parameter must be given (else one line)."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / WEIGHTS_FILE))
    params = dict(trainable(model))
    if set(saved) != set(params) or any(saved[k].shape != params[k].shape for k in saved):
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
        raise ValueError(f"the adapter in {folder} (rank {config.get('r')}, target_modules "
                         f"{config.get('target_modules')}) does not fit model.lora; resume with the same settings")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def base_of(folder, base: str | None = None) -> str:
    """The base model of an adapter checkpoint: `base` when given, else the folder its adapter_config.json
    names (the run's base, tags as tokens included) where it exists, else the base the checkpoint's own
    rntp_config.yaml describes (`rntp.think_tokens.base_model_path`, which remakes a tagged copy if needed)."""
    if base:
        return base
    named = json.loads((Path(folder) / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if named and Path(named).is_dir():
        return named
    config = Path(folder) / "rntp_config.yaml"
    if config.is_file():
        from rntp.config import load_config
        from rntp.think_tokens import base_model_path

        return base_model_path(load_config(config))
    if named:
        return named  # a hub name
    raise ValueError(f"{folder}: no base model found (adapter_config.json names none, no rntp_config.yaml); "
                     "pass the base model")


def merged_model(folder, base: str | None = None, dtype=torch.float32):
    """The base with the adapter in `folder` merged into its weights: a plain transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_of(folder, base), dtype=dtype)
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def export_merged(folder, out_dir, base: str | None = None, dtype=torch.float32) -> Path:
    """A Hugging Face folder (safetensors, config, the checkpoint's tokenizer) of the merged model,
    loadable by transformers and vLLM."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    merged_model(folder, base, dtype).save_pretrained(out_dir, safe_serialization=True)
    tokenizer_from = folder if (Path(folder) / "tokenizer_config.json").exists() else base_of(folder, base)
    AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def plain_model_path(path) -> Iterator[str]:
    """`path` itself for a whole model; for an adapter checkpoint, a temporary folder holding it merged
    into its base (what `rntp eval` scores and samples from, float32), removed afterwards."""
    import tempfile

    if not is_adapter_folder(path):
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="rntp-merged-") as tmp:
        yield str(export_merged(path, tmp))


class _View:
    """A frozen model made from the policy's own weights: called like a model, in eval mode, without
    gradients; `module` is the PEFT model (so the packed forward finds its head and config)."""

    training = False

    def __init__(self, peft_model):
        self.module = peft_model

    @property
    def config(self):
        return self.module.config

    def parameters(self):
        return self.module.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def requires_grad_(self, mode: bool = True):
        return self

    @contextlib.contextmanager
    def _frozen(self):
        was = self.module.training
        self.module.eval()  # no LoRA dropout, whatever mode the policy is in
        try:
            with torch.no_grad():
                yield
        finally:
            self.module.train(was)

    def __call__(self, *args, **kwargs):
        raise NotImplementedError


class BaseView(_View):
    """The base weights with the adapter off: the initial policy (KL reference, `initial` baseline,
    entropy filter). Each LoRA layer's own switch is flipped for the call; PEFT's
    `disable_adapter()` would also flip the adapter's requires_grad, which the optimizer and DDP hold."""

    def __call__(self, *args, **kwargs):
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.module.modules() if isinstance(m, LoraLayer)]
        before = [m._disable_adapters for m in layers]
        with self._frozen():
            for m in layers:
                m._disable_adapters = True
            try:
                return self.module(*args, **kwargs)
            finally:
                for m, b in zip(layers, before):
                    m._disable_adapters = b


class AdapterEMA(_View):
    """The EMA teacher under LoRA: float32 (or wider) copies of the adapter's tensors (PEFT's saved names) that
    follow the policy's, evaluated on the shared base (see the module docstring for what it is)."""

    def __init__(self, peft_model):
        super().__init__(peft_model)
        live = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        self.raw_names = {peft_key(n): n for n, _ in live}
        self.dtypes = {peft_key(n): p.dtype for n, p in live}  # the policy's adapter dtype, for the forward
        # float32 at least, whatever the adapter's dtype: a step of 1 - decay is below bfloat16's resolution
        self.tensors = {peft_key(n): p.detach().to(torch.promote_types(p.dtype, torch.float32)).clone()
                        for n, p in live}

    def named_parameters(self):  # what `rntp.train.follow` moves towards the pushed adapter
        return iter(self.tensors.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.tensors):
            raise ValueError("the checkpoint's EMA teacher is not an adapter of this model.lora")
        for k, v in state.items():
            self.tensors[k].copy_(v)

    def __call__(self, *args, **kwargs):
        with self._frozen():
            swapped = {self.raw_names[k]: v.to(self.dtypes[k]) for k, v in self.tensors.items()}
            return torch.func.functional_call(self.module, swapped, args, kwargs, strict=False)
