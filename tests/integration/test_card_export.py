"""A trained run's final checkpoint carries a model card, and `rntp export --push-to-hub` sends the folder with
its card. The upload itself cannot run here (no network): the hub client's calls are intercepted and what
they would send is checked (files, card, repo options)."""

import pytest
from huggingface_hub import HfApi, ModelCard, metadata_load

from rntp.cli import main
from rntp.train import train

pytestmark = pytest.mark.integration


@pytest.fixture
def hub(monkeypatch):
    """The hub client's calls, recorded instead of sent; what the folder holds when it is uploaded."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, folder_path, repo_id, **kw):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload_folder", repo_id, {**kw, "files": files, "token": self.token,
                                                 "card": metadata_load(Path(folder_path) / "README.md")}))
        return "https://huggingface.co/me/rntp-tiny/commit/abc"

    for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                       ("upload_folder", upload_folder)):
        monkeypatch.setattr(HfApi, name, fake)
    return calls


def test_final_checkpoint_card_and_export_to_the_hub(tiny_config, tmp_path, monkeypatch, hub, capsys):
    train(tiny_config("train.steps=2", "eval.every=2", "eval.num_positions=6", "eval.thoughts=2",
                      "eval.buckets=terciles"))
    final = tmp_path / "run" / "checkpoints" / "step_000002"
    card = ModelCard.load(final / "README.md")  # the Hub's parser
    assert card.data.library_name == "transformers" and "rntp" in card.data.tags
    assert "By difficulty (the starting model's next-token entropy" in card.text
    assert "| hard | 2 |" in card.text and "step 0 → step 2" in card.text

    capsys.readouterr()  # training's output
    out = tmp_path / "exported"
    args = ["export", "--model", str(tmp_path / "run"), "--out", str(out), "--push-to-hub", "me/rntp-tiny"]
    assert main(args) == 2  # the tests run with HF_HUB_OFFLINE=1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rntp export: error: --push-to-hub needs the network, and HF_HUB_OFFLINE=1 is set"]
    assert not out.exists() and hub == []  # nothing written, nothing sent

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(args) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err and not out.exists() and hub == []
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(out), "--push-to-hub", "not a name"]) == 2
    assert "is not a Hub repository name" in capsys.readouterr().err and not out.exists()

    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test_token")
    assert main([*args, "--private", "--revision", "v1"]) == 0
    assert [c[0] for c in hub] == ["create_repo", "create_branch", "upload_folder"]
    assert hub[0][1:] == ("me/rntp-tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    assert hub[1][1:] == ("me/rntp-tiny", {"branch": "v1", "repo_type": "model", "exist_ok": True})
    sent = hub[2][2]
    assert hub[2][1] == "me/rntp-tiny" and sent["revision"] == "v1" and sent["token"] == "hf_test_token"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(sent["files"])
    assert "trainer_state.pt" not in sent["files"] and "manifest.json" not in sent["files"]
    assert sent["card"]["library_name"] == "transformers" and "rntp" in sent["card"]["tags"]
    assert "https://huggingface.co/me/rntp-tiny/commit/abc" in capsys.readouterr().out

    def refused(self, **kw):
        raise OSError("403 Forbidden")

    monkeypatch.setattr(HfApi, "upload_folder", refused)
    again = tmp_path / "again"
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(again), "--push-to-hub", "me/x"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rntp export")]
    assert len(err) == 1 and "upload to me/x failed (OSError: 403 Forbidden)" in err[0]
    assert f"the exported folder {again} is complete" in err[0] and (again / "README.md").is_file()
