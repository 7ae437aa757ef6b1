"""The model's `config.json` and nothing else: from `model.from_config`, a local folder, an `s3://` prefix or the
Hugging Face hub (one small file, no weights, no torch)."""

from __future__ import annotations

import json
import os
from typing import Any

from ftdist.errors import SpecError
from ftdist.net import http_host_port, unreachable
from ftdist.spec import ModelSpec
from ftdist.storage.uri import is_remote


def model_config(model: ModelSpec) -> dict[str, Any]:
    if model.from_config is not None:
        return dict(model.from_config)
    where = model.name_or_path or ""
    try:
        if is_remote(where):
            raw = _s3_config(where)
        elif os.path.isdir(os.path.expanduser(where)):
            with open(os.path.join(os.path.expanduser(where), "config.json"), "rb") as fh:
                raw = fh.read()
        else:
            raw = _hub_config(where, model.revision)
        cfg = json.loads(raw)
    except SpecError:
        raise
    except (OSError, ValueError) as e:
        raise SpecError(f"model.name_or_path: {where}: cannot read its config.json ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise SpecError(f"model.name_or_path: {where}: config.json is not a JSON object")
    return cfg


def _s3_config(uri: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    from ftdist.storage import s3
    from ftdist.storage.uri import split_s3

    bucket, key = split_s3(uri.rstrip("/") + "/config.json")
    try:
        return s3.client(s3.PROBE).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError) as e:
        raise SpecError(s3.describe_error(e, uri)) from None


def _hub_config(repo: str, revision: str | None) -> bytes:
    """config.json from the local hub cache, else from the hub, asked once: huggingface_hub retries an unreachable
    hub five times with backoff (23 s), so the endpoint is probed first (3 s)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(cached, str):
        if constants.HF_HUB_OFFLINE:
            raise SpecError(f"model.name_or_path: {repo}: config.json is not in the hub cache and HF_HUB_OFFLINE is "
                            f"set")
        _probe(constants.ENDPOINT, repo)
        try:
            cached = hf_hub_download(repo, "config.json", revision=revision)
        except LocalEntryNotFoundError:
            raise SpecError(f"model.name_or_path: {repo}: the Hugging Face hub did not answer for config.json") from None
        except HfHubHTTPError as e:
            raise SpecError(f"model.name_or_path: {repo}: the Hugging Face hub refused config.json "
                            f"({type(e).__name__}; a gated or private repo needs HF_TOKEN)") from None
    with open(cached, "rb") as fh:
        return fh.read()


def _probe(endpoint: str, repo: str) -> None:
    if why := unreachable(*http_host_port(endpoint), 3):
        raise SpecError(f"model.name_or_path: {repo}: the Hugging Face hub ({endpoint}) is not reachable from here "
                        f"({why}); plan with a local folder or s3:// copy of the model, or set HF_ENDPOINT")
