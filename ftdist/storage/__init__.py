"""Where runs live: storage URIs (uri), S3 plumbing (s3), a small object-store interface (store), committed
checkpoints (checkpoints), the one-live-attempt lease (lease) and the node-local download cache (cache)."""
