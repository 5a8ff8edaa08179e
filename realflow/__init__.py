"""realflow: RLHF algorithms as dataflow graphs of model function calls over packed sequences.

Importing this package is cheap: torch, transformers, Ray and deepspeed load where they are used.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# libgomp (torch's OpenMP on Linux) spins 300000 times (~ms) at every barrier before sleeping
# when its threads fit the cores. On a machine shared with other work a spinning thread holds
# the core its partner needs: decode (hundreds of small parallel regions a step) measured 10-20x
# slower at load 15 on 2 cores. 1000 spins keep the wake-up fast on an idle machine and cost
# nothing under load (benchmarks/RESULTS.md, peer benchmark). libgomp reads this once, when
# torch loads: only set here if torch is not imported yet and the user did not set it.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")
