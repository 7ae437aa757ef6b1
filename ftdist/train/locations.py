"""Model and tokenizer locations (hub id, local folder, s3:// prefix) made local once per node, and the tokenizer
loader. Light on purpose: the driver's data preflight and the export task use it without DeepSpeed."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoTokenizer

from ftdist.errors import SpecError
from ftdist.spec import ModelSpec
from ftdist.storage.cache import download
from ftdist.storage.uri import is_remote


def resolve_location(path: str, revision: Optional[str] = None) -> str:
    """A local folder for a model/tokenizer location. Called by one process per node (local rank 0) first."""
    if is_remote(path):
        return download(path)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if path.startswith(("/", ".", "~")):
        raise SpecError(f"model: {path}: no such directory")
    try:
        return snapshot_download(path, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tokenizer*"])
    except Exception as e:  # hub raises many types: offline, 404, gated, auth
        raise SpecError(f"model: {path}: cannot fetch from the Hugging Face hub ({e.__class__.__name__})") from None


def prefetch_per_node(spec: ModelSpec, local_rank: int, barrier) -> tuple[Optional[str], str]:
    """Download model + tokenizer once per node: local rank 0 fetches, the others wait, then all resolve from cache."""
    paths: list[Optional[str]] = []

    def fetch() -> None:
        paths.clear()
        paths.append(resolve_location(spec.name_or_path, spec.revision) if spec.name_or_path else None)
        tok = spec.tokenizer_path
        paths.append(paths[0] if tok == spec.name_or_path else resolve_location(tok, spec.revision))

    if local_rank == 0:
        fetch()
    barrier()
    if local_rank != 0:
        fetch()  # served from the node cache now
    return paths[0], paths[1]  # type: ignore[return-value]


def preflight_tokenizer(spec: ModelSpec) -> Optional[Any]:
    """The job's tokenizer on the driver, for checking the data before Ray starts: from its folder, or from the hub
    (tokenizer files only). A hub id that does not exist, a gated repo or a missing revision is a one-line error
    naming the key; no connection to the hub returns None with a note (the workers, maybe on another network, try)."""
    path = spec.tokenizer_path
    local = os.path.expanduser(path)
    key = "model.tokenizer" if spec.tokenizer else "model.name_or_path"
    if os.path.isdir(local):
        try:
            return load_tokenizer(local, spec.trust_remote_code)
        except (OSError, ValueError, TypeError) as e:  # transformers says "couldn't instantiate the backend ..."
            raise SpecError(f"{key}: {path}: no tokenizer in this folder (tokenizer.json or tokenizer_config.json "
                            f"with its files; {type(e).__name__})") from None
    try:
        return load_tokenizer(path, spec.trust_remote_code, revision=spec.revision)
    except OSError as e:
        cause = e.__cause__
        if isinstance(cause, GatedRepoError):
            raise SpecError(f"{key}: {path}: a gated repo on the Hugging Face hub; request access on its page and "
                            f"set HF_TOKEN (or `hf auth login`)") from None
        if isinstance(cause, RepositoryNotFoundError):
            raise SpecError(f"{key}: {path}: no such folder here and no such (public) repo on the Hugging Face hub; "
                            f"for a private repo set HF_TOKEN") from None
        if isinstance(cause, RevisionNotFoundError):
            raise SpecError(f"model.revision: {spec.revision}: no such branch, tag or commit in {path}") from None
        print(f"ftdist: note: {key}: {path}: not reachable on the Hugging Face hub from here (data rows are checked "
              f"by the workers)", file=sys.stderr)
        return None


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None) -> Any:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
