"""LoRA adapters for samplers (a `model.lora` run): the folder vLLM's LoRA loader reads, in PEFT's format.

vLLM 0.32 loads an adapter from a folder (`adapter_config.json`, `adapter_model.safetensors`:
vllm/lora/worker_manager.py, `LoRAModel.from_local_checkpoint`); `LoRARequest(load_inplace=True)` under
the id it already holds reloads it in place (vllm/lora/request.py, `LRUCacheWorkerLoRAManager.add_adapter`:
the old one is removed and the new one added under the same id), leaving the base weights as they are.
So a push writes the adapter's tensors into one folder and asks the engine (in-process: `add_lora`; a
server: `/v1/load_lora_adapter` with `load_inplace`) to reload it; requests then name the same adapter
without `load_inplace` (with it, every engine step would reload from disk: `_apply_adapters` runs at
every forward). The prefix cache is reset after each push, as for full weights (cached blocks hold the
old adapter's keys and values).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME = "rntp-policy"  # the adapter's name in an engine or server
ID = 1  # ... and its id (vLLM wants one > 0)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"model.lora.rank={rank} is above vLLM's largest max_lora_rank ({VLLM_RANKS[-1]})")


def save_adapter(folder, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """An adapter folder in PEFT's format (what `PeftModel.from_pretrained` and vLLM read): the tensors
    under PEFT's saved names, and adapter_config.json. The config is written last, so a reader that finds it
    finds the weights it describes."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
