"""A user metric for eval.generate tests (loaded as file.py:function, as a user's metric file next to a job)."""


def length_ratio(prediction: str, reference: str) -> float:
    """Words predicted per reference word, capped at 1."""
    return min(1.0, len(prediction.split()) / max(1, len(reference.split())))
