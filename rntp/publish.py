"""`rntp export --push-to-hub ORG/NAME`: an exported folder, card included, to a Hugging Face Hub model repo.

Through `huggingface_hub` (its token from the usual places: HF_TOKEN, or `hf auth login`'s file). What
can be checked before anything is written (the repository name, being online, having a token) is
checked first, so a push that cannot happen leaves nothing behind. The folder goes up as one commit:
a failed upload leaves no half-uploaded revision on the Hub either.
"""

from __future__ import annotations

from pathlib import Path


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
