"""`ftdist preflight`: check that a cluster can really run a job before GPUs are spent on it."""
