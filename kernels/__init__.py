"""deltapass.kernels: the Δ-attention op, its exact reference and its Triton kernels.

Needs torch and triton only.
"""
if __name__ != "deltapass.kernels":
    # From a source checkout, the repository root on sys.path (`python -m ...`, `python -c`, a prompt opened
    # there) makes this folder importable as a top-level `kernels`, the import name of Hugging Face's kernels
    # package, which transformers imports. This folder is deltapass.kernels only: step aside for an installed
    # `kernels` (or report it missing), and never run op.py a second time, which would re-register the ops.
    from ._step_aside import import_installed

    import_installed(__name__, __file__)
else:
    from .launch import LaunchConfig, default_launch
    from .limits import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, unsupported_reason
    from .masked import (MASK_KINDS, delta_attention_masked, exact_attention_masked, exact_masked_attention,
                         keeps_exactly_causal, mask_is_causal)
    from .op import delta_attention
    from .prompt import current_prompt_length, prompt_length
    from .reference import reference_delta_attention
    from .rule import CORRECTIONS, DeltaPlan, anchor_row, causal, sample_row, sink_or_window, sparse_keep, tail_row
    from .varlen import delta_attention_varlen

    __all__ = [
        "CORRECTIONS", "DeltaPlan", "LaunchConfig", "MASK_KINDS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS",
        "anchor_row", "causal", "current_prompt_length", "default_launch", "delta_attention",
        "delta_attention_masked", "delta_attention_varlen", "exact_attention_masked", "exact_masked_attention", "keeps_exactly_causal", "mask_is_causal",
        "prompt_length", "reference_delta_attention", "sample_row", "sink_or_window", "sparse_keep", "tail_row",
        "unsupported_reason",
    ]
