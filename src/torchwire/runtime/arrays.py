"""What the codecs hand the models and get back: one request's tensors as numpy arrays (batch
dimension first), and how their shapes are checked against a model's. Apart from ``model.py`` so
that the wire side depends on this, not on the model runtime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Arrays = list[np.ndarray[Any, Any]]
"""One array per tensor (input or output), each with the batch dimension first."""


def shape_matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether ``actual`` fits ``expected``, where -1 in ``expected`` matches any size."""
    return len(actual) == len(expected) and all(
        want in (-1, got) for got, want in zip(actual, expected, strict=True)
    )
