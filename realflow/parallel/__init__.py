"""Parallel layouts (DP x TP x PP), tensor-parallel layers, pipeline schedules and parameter
reallocation. See docs/parallel.md.

Modules (import what you need; this package imports nothing, so models can import the
torch-only parts without a cycle):

    layout     Layout ("d2t1p1"), Mesh ("d1t2p1@0-1"), Coords                 (pure Python)
    partition  ShardSpec, which block of each parameter a worker holds        (pure Python)
    tp         tensor-parallel autograd ops and layers                        (torch)
    vocab      vocab-parallel log-probs / entropy / cross-entropy             (torch)
    groups     MeshGroups: torch.distributed groups of a mesh
    model      build_model, load_full_state_dict, gather_full_model
    flat       FlatParams: a shard's parameters as one flat buffer
    realloc    plan_realloc, execute_realloc
    ops        interval copies (csrc/ extension or pure-torch fallback)
    pipeline   PipelineRunner: 1F1B forward-backward, forward
    generate   parallel_generate
    grads      grad_norm, clip_grad_norm_ across tp / pp
"""
