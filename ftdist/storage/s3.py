"""S3-compatible object storage plumbing: endpoint/region from the standard AWS environment, boto3 clients with
retries, the pyarrow filesystem Ray Train uses for its own files, and one-line errors for user mistakes.

Credentials are never read, stored or logged by ftdist: boto3 and pyarrow take them from the AWS credential chain
(environment, shared config/profile, web identity / pod identity, instance metadata).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                 NoCredentialsError, PartialCredentialsError, ReadTimeoutError)
from pyarrow import fs

from ftdist.errors import SpecError
from ftdist.storage.uri import split_s3


def endpoint_url() -> Optional[str]:
    """The S3 endpoint for MinIO/SeaweedFS/Ceph (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL); None means AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# Non-secret settings that workers on other nodes need to reach the same store. Credentials are deliberately not
# here: on a cluster every node has its own (pod identity, instance profile, a mounted secret).
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


def forwarded_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


@dataclass(frozen=True)
class ClientOptions:
    max_attempts: int = 10
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_pool_connections: int = 32


PROBE = ClientOptions(max_attempts=2, connect_timeout=3.0, read_timeout=15.0)
"""For a check the user waits on (preflight, `ftdist checkpoints`, reading a config.json): a wrong endpoint answers
in seconds, where the upload defaults retry for half a minute."""


def client(opts: ClientOptions = ClientOptions()) -> Any:
    """A boto3 S3 client. botocore's 'standard' retry mode retries throttling, 5xx, timeouts and connection errors
    with exponential backoff and full jitter, up to max_attempts per request (each multipart part is a request)."""
    cfg = Config(
        retries={"max_attempts": opts.max_attempts, "mode": "standard"},
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        max_pool_connections=opts.max_pool_connections,
        # No SHA-256 of the body for the SigV4 signature (UNSIGNED-PAYLOAD): botocore would otherwise hash every
        # byte once more whenever the request is plain http or carries no checksum header (our case, see below).
        # Content is verified end to end by ftdist's manifest hashes; TLS protects it in transit on https.
        s3={"payload_signing_enabled": False, **({"addressing_style": "path"} if endpoint_url() else {})},
        # Only send/require flexible checksums where an operation needs them: not every S3-compatible server
        # accepts the aws-chunked trailer. ftdist verifies content with its own manifest hashes.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url(), region_name=region(), config=cfg)


def pyarrow_fs() -> Any:
    """The pyarrow S3FileSystem for Ray Train's storage_path, pointed explicitly at the same endpoint (a bare
    S3FileSystem() ignores AWS_ENDPOINT_URL)."""
    ep = endpoint_url()
    kwargs: dict = {"region": region(), "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=10)}
    if ep:
        u = urlparse(ep)
        kwargs["endpoint_override"] = u.netloc + u.path.rstrip("/")
        kwargs["scheme"] = u.scheme or "https"
        kwargs["force_virtual_addressing"] = False
    return fs.S3FileSystem(**kwargs)


def describe_error(e: BaseException, uri: str) -> str:
    """One line for a storage failure, naming the URI and the likely cause; never any credential value."""
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return f"{uri}: no usable AWS credentials (set them in the AWS environment, a profile or pod identity)"
    if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
        return f"{uri}: cannot reach the S3 endpoint {endpoint_url() or '(AWS default)'}"
    if isinstance(e, ReadTimeoutError):
        return f"{uri}: the S3 endpoint {endpoint_url() or '(AWS default)'} timed out"
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and "bucket" in str(e).lower()):
            return f"{uri}: bucket {split_s3(uri)[0]!r} does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AuthorizationHeaderMalformed",
                    "InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
            return f"{uri}: the AWS credentials were rejected ({code})"
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return f"{uri}: access denied (check the credentials and the bucket policy; {code or status})"
        return f"{uri}: S3 error {code or status}: {str(err.get('Message', ''))[:160]}"
    return f"{uri}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def check_access(uri: str, probe_write: bool = True, extra_args: Optional[dict] = None) -> None:
    """Before training: the endpoint answers, the credentials work, the bucket exists and (probe_write) ftdist may
    write and delete under the prefix. Raises SpecError with one line; leaves nothing behind."""
    bucket, key = split_s3(uri)
    c = client(PROBE)
    try:
        try:
            c.head_bucket(Bucket=bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise SpecError(f"{uri}: bucket {bucket!r} does not exist") from None
            # HEAD has no body, so a bad key shows only as 403: ask again with a request that names the cause.
            c.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            raise
        c.list_objects_v2(Bucket=bucket, Prefix=(key + "/") if key else "", MaxKeys=1)
        if probe_write:
            probe = f"{key}/.ftdist-write-probe-{os.getpid()}".lstrip("/")
            c.put_object(Bucket=bucket, Key=probe, Body=b"", **(extra_args or {}))
            c.delete_object(Bucket=bucket, Key=probe)
    except SpecError:
        raise
    except (ClientError, BotoCoreError) as e:
        raise SpecError(describe_error(e, uri)) from None
