"""--push_to_hub without the network: the preflight fails fast with one line, and the push uploads the final
folder through huggingface_hub's HfApi (here a local recorder with HfApi's method signatures)."""

import time
from types import SimpleNamespace

import pytest

from engine import hub
from engine.config import parse_config
from engine.errors import UserError


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records each call, answers whoami with user `me`."""

    def __init__(self, fail_upload: bool = False):
        self.calls = []
        self.fail_upload = fail_upload

    def whoami(self, token=None):
        self.calls.append(("whoami", token))
        return {"name": "me"}

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, *, branch, token=None, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision, ignore_patterns, token):
        if self.fail_upload:
            raise OSError("503 Service Unavailable")
        self.calls.append(("upload_folder", repo_id, folder_path, revision, tuple(ignore_patterns)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")


def config(tmp_path, *flags):
    return parse_config(["--push_to_hub", "--output_dir", str(tmp_path / "smollm3-custom"), *flags])


@pytest.fixture
def online(monkeypatch):
    """A token and a reachable endpoint, without touching the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_reachable", lambda endpoint: None)


def test_preflight_refuses_offline_mode_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 is set"):
        hub.preflight(config(tmp_path, "--hub_token", "hf_x"))
    assert time.monotonic() - started < 2.0


def test_preflight_refuses_a_missing_token(tmp_path, monkeypatch):
    """No --hub_token, no HF_TOKEN, no stored login (HF_HOME points at an empty folder)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(UserError, match="no Hugging Face token; run `hf auth login`"):
        hub.preflight(config(tmp_path))


def test_preflight_refuses_an_unreachable_hub_in_seconds(tmp_path, monkeypatch):
    """A real connection attempt to a closed local port (the Hub stands in for 'no network'): refused at once."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(UserError, match=r"cannot reach http://127.0.0.1:9"):
        hub.preflight(config(tmp_path, "--hub_token", "hf_x"))
    assert time.monotonic() - started < hub.NETWORK_TIMEOUT_S + 1


def test_preflight_creates_the_repo_in_the_users_namespace(tmp_path, online):
    """As TRL: no --hub_model_id -> the output folder's name under the token's user; the repo is created up front
    (so a token without write access fails before training)."""
    api = RecordingApi()
    repo_id = hub.preflight(config(tmp_path, "--hub_token", "hf_x", "--hub_private_repo"), api=api)
    assert repo_id == "me/smollm3-custom"
    assert api.calls == [("whoami", "hf_x"), ("create_repo", "me/smollm3-custom", True, True)]


def test_preflight_turns_a_hub_error_into_one_line(tmp_path, online):
    class Forbidden(RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("403 Forbidden: you cannot write to org/x\nmore detail")

    with pytest.raises(UserError, match=r"cannot create org/x on the Hub \(403 Forbidden: you cannot write to org/x\)"):
        hub.preflight(config(tmp_path, "--hub_token", "hf_x", "--hub_model_id", "org/x"), api=Forbidden())


def test_push_uploads_the_final_folder_without_checkpoints(tmp_path, online):
    cfg = config(tmp_path, "--hub_model_id", "you/smollm3-custom", "--hub_revision", "v1", "--hub_token", "hf_x")
    api = RecordingApi()
    repo_id = hub.preflight(cfg, api=api)
    url = hub.push(cfg, cfg.output_dir, repo_id, api=api)
    assert url == "https://huggingface.co/you/smollm3-custom/commit/abc"
    assert ("create_branch", "you/smollm3-custom", "v1") in api.calls
    upload = api.calls[-1]
    assert upload[:4] == ("upload_folder", "you/smollm3-custom", cfg.output_dir, "v1")
    assert "checkpoint-*" in upload[4]


def test_a_failed_upload_says_where_the_model_is(tmp_path, online):
    cfg = config(tmp_path, "--hub_model_id", "you/m")
    with pytest.raises(UserError, match=r"upload to you/m failed \(503 Service Unavailable\); the model is saved in"):
        hub.push(cfg, cfg.output_dir, "you/m", api=RecordingApi(fail_upload=True))


def test_no_push_no_check(tmp_path):
    """Without --push_to_hub the preflight does nothing, even offline."""
    assert hub.preflight(parse_config(["--output_dir", str(tmp_path)])) is None


def test_the_token_never_reaches_the_saved_config_or_stderr(capsys):
    """train_config.json is written next to the model and uploaded with it: the token is blanked; warnings that
    echo flag values hide it."""
    from engine.config import config_to_dict

    assert config_to_dict(parse_config(["--push_to_hub", "--hub_token", "hf_secret"]))["hub_token"] is None
    assert "hf_secret" not in capsys.readouterr().err
