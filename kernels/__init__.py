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
    from .masked import (MASK_KINDS, delta_attention_masked, exact_masked_attention, keeps_exactly_causal,
                         mask_is_causal)
    from .op import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, delta_attention
    from .reference import reference_delta_attention
    from .rule import CORRECTIONS, DeltaPlan, causal, sink_or_window, sparse_keep

    __all__ = [
        "CORRECTIONS", "DeltaPlan", "LaunchConfig", "MASK_KINDS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS",
        "causal", "default_launch", "delta_attention", "delta_attention_masked", "exact_masked_attention",
        "keeps_exactly_causal", "mask_is_causal", "reference_delta_attention",
        "sink_or_window", "sparse_keep",
    ]
