"""State that every pass of a run shares, in the spirit of TVM's PassContext."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping

import numpy as np


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclasses.dataclass
class PassContext:
    """Options of the run and data that passes may need.

    ``calibration`` is a calibration-data reader (quantization, activation-based
    pruning); ``inputs`` are sample inputs for verification; ``input_shapes``
    pins dynamic dimensions.  ``vector_lanes``: fp32 lanes of the target's
    vector registers where the run knows its target (hardware-friendly sizes,
    e.g. prune-channels' round-to).  ``scratch`` lets cooperating passes share results
    (e.g. an analysis reused by a later transform) without globals.
    """

    seed: int = 0
    calibration: Any = None
    inputs: Mapping[str, np.ndarray] | None = None
    input_shapes: Mapping[str, list[int]] | None = None
    tolerance: float | None = None
    vector_lanes: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: Callable[[str], None] = _stderr
    quiet: bool = False

    def info(self, msg: str) -> None:
        if not self.quiet:
            self.log(msg)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])
