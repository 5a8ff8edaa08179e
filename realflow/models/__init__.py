"""Models: the packed varlen transformer, attention backends, HF family converters, generation.

Import the submodules you need; this package imports nothing heavy (no transformers):

    from realflow.models.config import TransformerConfig
    from realflow.models.transformer import PackedTransformer
    from realflow.models.hf_io import load_hf, save_hf, init_from_actor
    from realflow.models.builtin import builtin_config
    from realflow.models.generation import GenerationConfig, GenerationOutput, generate
"""
