"""deltapass.kernels: the Δ-attention op, its exact reference and its Triton kernels.

Needs torch and triton only.
"""
if __name__ != "deltapass.kernels":
    # From a source checkout, the repository root on sys.path (`python -m ...`, `python -c`) makes this
    # folder importable as a top-level `kernels` too, a name transformers imports to probe for the Hugging
    # Face kernels package. Expose nothing under that name: running op.py again would re-register the
    # deltapass ops and leave the first copy's op objects pointing at freed registrations.
    __path__: list[str] = []
    __all__: list[str] = []
else:
    from .launch import LaunchConfig, default_launch
    from .limits import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, unsupported_reason
    from .masked import (MASK_KINDS, delta_attention_masked, exact_attention_masked, exact_masked_attention,
                         keeps_exactly_causal, mask_is_causal)
    from .op import delta_attention
    from .reference import reference_delta_attention
    from .rule import CORRECTIONS, DeltaPlan, anchor_row, causal, sample_row, sink_or_window, sparse_keep, tail_row

    __all__ = [
        "CORRECTIONS", "DeltaPlan", "LaunchConfig", "MASK_KINDS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS",
        "anchor_row", "causal", "default_launch", "delta_attention", "delta_attention_masked",
        "exact_attention_masked", "exact_masked_attention", "keeps_exactly_causal", "mask_is_causal",
        "reference_delta_attention", "sample_row", "sink_or_window", "sparse_keep", "tail_row",
        "unsupported_reason",
    ]
