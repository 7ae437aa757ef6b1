"""Tests that start real parts: a local Ray cluster, DeepSpeed training on gloo, a SeaweedFS S3 server."""
