"""realflow: RLHF algorithms as dataflow graphs of model function calls over packed sequences.

Importing this package is cheap: torch, transformers, Ray and deepspeed load where they are used.
"""

__version__ = "0.1.0"
