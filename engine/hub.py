"""--push_to_hub: check the Hub before training, upload the final folder after it.

    preflight(config)               before step 1: token, HF_HUB_OFFLINE, network, repo creation -> the repo id
    push(config, output_dir, repo)  after the final model, tokenizer and README.md are written

The check runs first so that a missing token, `HF_HUB_OFFLINE=1` or no network fails in seconds with one line,
never after hours of training. As in TRL: the repo id defaults to the output folder's name in the user's
namespace, `--hub_strategy end` (and TRL's default `every_save`, whose intermediate pushes nanopost does not
make) uploads the final folder once, without checkpoints.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from engine.errors import UserError

NETWORK_TIMEOUT_S = 5.0
# Never uploaded: resumable checkpoints (--hub_strategy end pushes the final model only) and our scratch files.
IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", ".write-test-*", "*.pt", "*.pth"]


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reachable(endpoint: str) -> str | None:
    """None if a TCP connection to the endpoint opens within NETWORK_TIMEOUT_S, else why not."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as error:
        return str(error) or type(error).__name__
    return None


def preflight(config, api=None) -> str | None:
    """Fail fast (UserError) when the push at the end could not happen; return the repo id to push to."""
    if not config.push_to_hub:
        if config.hub_model_id:  # the course's YAML: hub_model_id with push_to_hub: false
            print(f"[nanopost] push_to_hub is false: nothing is pushed to {config.hub_model_id}", flush=True)
        return None
    if _offline():
        raise UserError("--push_to_hub: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; "
                        "unset HF_HUB_OFFLINE or drop --push_to_hub")
    from huggingface_hub import HfApi, get_token

    token = config.hub_token or get_token()
    if not token:
        raise UserError("--push_to_hub: no Hugging Face token; run `hf auth login`, set HF_TOKEN or give --hub_token")
    endpoint = _endpoint()
    why = _reachable(endpoint)
    if why is not None:
        raise UserError(f"--push_to_hub: cannot reach {endpoint} ({why}); check the network or drop --push_to_hub")
    api = api or HfApi(endpoint=endpoint, token=token)
    repo_id = config.hub_model_id or Path(config.output_dir).resolve().name
    try:
        if "/" not in repo_id:
            repo_id = f"{api.whoami(token=token)['name']}/{repo_id}"
        api.create_repo(repo_id, token=token, private=config.hub_private_repo, exist_ok=True)
        if config.hub_revision:
            api.create_branch(repo_id, branch=config.hub_revision, token=token, exist_ok=True)
    except OSError as error:  # huggingface_hub's HTTP errors are OSErrors (401: bad token, 403: no write access)
        raise UserError(f"--push_to_hub: cannot create {repo_id} on the Hub ({_first_line(error)}); "
                        "check the token's write access and --hub_model_id") from error
    return repo_id


def push(config, output_dir: str | os.PathLike, repo_id: str, api=None) -> str:
    """Upload the final folder (model, tokenizer, README.md, metrics) to `repo_id`; return the commit URL."""
    from huggingface_hub import HfApi

    token = config.hub_token  # None: huggingface_hub finds the stored token itself
    api = api or HfApi(endpoint=_endpoint(), token=token)
    try:
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="End of training",
                                   revision=config.hub_revision, ignore_patterns=IGNORE_PATTERNS, token=token)
    except OSError as error:
        raise UserError(f"--push_to_hub: upload to {repo_id} failed ({_first_line(error)}); the model is saved in "
                        f"{output_dir}: upload it later with `hf upload {repo_id} {output_dir}`") from error
    return str(getattr(commit, "commit_url", commit))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
