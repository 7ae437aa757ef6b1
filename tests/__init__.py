"""Tests of ftdist: unit/ (fast, no Ray, no DeepSpeed spawn, no S3 server), integration/ (real Ray, DeepSpeed,
S3), gpu/ (a CUDA device), support/ (servers and clusters the tests start)."""
