"""deltapass.search: the accuracy harness and the per-GPU tuner (Optuna).

Empty until the accuracy harness lands; nothing here is imported by the kernels.
"""
