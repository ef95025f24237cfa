"""`rntp export`: a checkpoint as a plain Hugging Face folder with its model card, and with `--push-to-hub
ORG/NAME` that folder to a Hugging Face Hub model repo.

Through `huggingface_hub` (its token from the usual places: HF_TOKEN, or `hf auth login`'s file). What
can be checked before anything is written (the repository name, being online, having a token) is
checked first, so a push that cannot happen leaves nothing behind. The folder goes up as one commit:
a failed upload leaves no half-uploaded revision on the Hub either.
"""

from __future__ import annotations

from pathlib import Path


def export(path, out_dir, base: str | None = None, dtype: str = "float32") -> Path:
    """`rntp export`: a plain Hugging Face folder from a checkpoint (or a run folder's newest intact one):
    a LoRA adapter merged into its base, a whole-model checkpoint without its trainer state; with its model
    card (README.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rntp.card import write_card
    from rntp.checkpoint import find_checkpoint
    from rntp.lora import export_merged, is_adapter_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty; export into a new folder")
    bare_adapter = is_adapter_folder(path) and not (Path(path) / "manifest.json").exists()  # PEFT's own save
    ckpt = Path(path) if bare_adapter else find_checkpoint(path)  # verified against its manifest
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if is_adapter_folder(ckpt):
        export_merged(ckpt, out_dir, base, torch_dtype)
    else:
        AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype).save_pretrained(out_dir, safe_serialization=True)
        AutoTokenizer.from_pretrained(ckpt).save_pretrained(out_dir)
    write_card(out_dir, ckpt, adapter=False, merged=is_adapter_folder(ckpt), base=base)  # what it is, how to use it
    return out_dir


def push_problem(repo_id: str) -> str | None:
    """Why a push to `repo_id` cannot start here, or None."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from rntp.prepare import hub_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return f"--push-to-hub {repo_id!r} is not a Hub repository name (ORG/NAME)"
    if hub_offline():
        return "--push-to-hub needs the network, and HF_HUB_OFFLINE=1 is set"
    if get_token() is None:
        return "--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`"
    return None


def push_to_hub(folder: Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Create the model repo (if new; `private` only applies then), the branch `revision` (if given and new),
    and upload `folder` to it as one commit; returns the commit's URL."""
    from huggingface_hub import HfApi, get_token

    api = HfApi(token=get_token())
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                               commit_message=f"Upload {Path(folder).name} exported by rntp")
    return str(getattr(commit, "commit_url", commit))
