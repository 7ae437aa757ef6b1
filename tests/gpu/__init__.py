"""Tests that need a CUDA device (`python -m pytest -m gpu` on a GPU machine; skipped elsewhere)."""
