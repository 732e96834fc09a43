"""deltapass.search: the accuracy harness and the per-GPU tuner (Optuna).

models   - load the embedded SmolLM2-135M-Instruct GGUF or a local model
tasks    - passkey, multi-key needle and continuation tasks from shipped prose
harness  - evaluate(model, config, tasks) -> scores with intervals; prefill latency
report   - tables (markdown, JSON) and plots; accuracy - the standard sweep
space    - what a trial may choose; storage - Optuna storages with heartbeats; tune - the job

Nothing here is imported by the kernels or the pass; the CLI imports it lazily.
"""
if __name__ != "deltapass.search":
    # From a checkout's root this folder is also importable as a top-level `search`: hand that name to an
    # installed package of that name, as kernels/ does.
    from deltapass.kernels._step_aside import import_installed

    import_installed(__name__, __file__)
