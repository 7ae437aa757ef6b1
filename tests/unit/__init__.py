"""Fast tests: no Ray, no DeepSpeed spawn, no S3 server (`python -m pytest tests/unit`, under a minute)."""
