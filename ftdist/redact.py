"""What looks like a secret, and how errors avoid repeating one. Pure string work, used by the schemas (a secret
typed into a job file is refused), the submit path (`--env`, `--header`) and the CLI (every error line it prints
passes through `redact` as a last guard).

An error names the key, flag or file; it never quotes the value of anything secret-looking. Users paste tokens
into the wrong place (`--set kubernetes.env.HF_TOKEN:hf_...`, a token where a Secret's name goes), and an echo of
that input lands in a terminal scrollback, a CI log or a ticket.
"""

from __future__ import annotations

import re
from typing import Optional

SECRET_ENV_RE = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|_KEY$|^KEY$|SESSION|APIKEY)", re.I)
"""Environment variable names that hold secrets: never given as values in job files or submissions."""

_SECRET_VALUE_RES = (
    re.compile(r"\bhf_[A-Za-z0-9]{16,}"),                       # Hugging Face tokens
    re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{16,}"),           # OpenAI / Stripe-style keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),                # GitHub tokens
    re.compile(r"\bglpat-[A-Za-z0-9_-]{16,}"),                  # GitLab tokens
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),              # Slack tokens
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),               # AWS access key ids
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),   # JWTs (Kubernetes service-account tokens, OIDC)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # key=value credentials: connection strings (AccountKey=...), URL query tokens (?sig=..., &token=...)
    re.compile(r"(?i)\b(?:AccountKey|SharedAccessKey|SharedAccessSignature|sig|password|passwd|pwd|secret|token|"
               r"api[_-]?key|access[_-]?key|secret[_-]?key)\s*=\s*[^\s;&,'\"]{4,}"),
    re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"\bBasic\s+(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{8,}={0,2}"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),                      # user:password@ in a URL
    # A long random-looking word (an API key without a known prefix): upper, lower and digits together and no
    # separators. Path segments, hex digests and UUIDs do not match.
    re.compile(r"(?<![/\w.+-])(?=[A-Za-z0-9+]*[A-Z])(?=[A-Za-z0-9+]*[a-z])(?=[A-Za-z0-9+]*[0-9])"
               r"[A-Za-z0-9+]{30,}={0,2}(?![\w./+-])"),
)

REDACTED = "<redacted>"


def looks_like_secret(value: str) -> bool:
    """Whether a value (an env var value, a name typed where a name belongs) holds something credential-like."""
    return any(r.search(value) for r in _SECRET_VALUE_RES)


def env_secret_problem(name: str, value: str) -> Optional[str]:
    """Why an environment variable may not be given as a plain value (a job file's kubernetes.env, `submit --env`):
    its name says secret, or its value looks like a credential; None when it may."""
    if SECRET_ENV_RE.search(name):
        return "looks like a secret"
    if looks_like_secret(value):
        return "has a value that looks like a credential"
    return None


def redact(text: str) -> str:
    """`text` with every secret-looking run replaced by <redacted>."""
    for r in _SECRET_VALUE_RES:
        text = r.sub(REDACTED, text)
    return text


def key_hint(text: str) -> str:
    """The leading name-like part of what was typed (letters, digits, '.', '_', '-'), to say which argument is meant
    without echoing anything after it (`HF_TOKEN:hf_abc` -> `HF_TOKEN...`)."""
    m = re.match(r"[A-Za-z0-9_.-]*", text.strip())
    hint = m.group(0)[:60] if m else ""
    if not hint or looks_like_secret(hint):
        return "(value not shown)"
    return hint if hint == text.strip() else f"{hint}..."
