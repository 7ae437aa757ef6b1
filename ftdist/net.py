"""One TCP probe for every address a command is given (a Ray cluster, a dashboard, the Hugging Face hub): a few
seconds to a one-line error instead of a library's minutes of retries. Torch-free."""

from __future__ import annotations

import socket
from typing import Optional
from urllib.parse import urlparse


def http_host_port(url: str) -> tuple[Optional[str], int]:
    """(host, port) of an http(s) URL; the scheme's default port when none is given."""
    u = urlparse(url)
    return u.hostname, u.port or (443 if u.scheme == "https" else 80)


def unreachable(host: Optional[str], port: int, timeout: float) -> Optional[str]:
    """Why a TCP connection to host:port fails within `timeout` seconds (the OS's words), or None if it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__
