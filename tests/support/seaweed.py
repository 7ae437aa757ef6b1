"""The SeaweedFS launcher lives in the package (ftdist bench uses it too)."""

from ftdist.bench.local_s3 import S3Server, new_credentials, start_seaweedfs  # noqa: F401

__all__ = ["S3Server", "new_credentials", "start_seaweedfs"]
