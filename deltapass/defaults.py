"""Plain numbers that the CLI's --help states, importable without torch: the accuracy targets, the tuner's budget
and the tuning job's defaults. presets.py names the targets with the presets; search/tune.py's TuneSettings and
search/space.py's SparsitySpace take their defaults from here, and so do the CLI's options."""

RETRIEVAL_TARGET = 0.95        # passkey and multi-key accuracy as a fraction of dense
LOSS_GAP_TARGET = 0.75         # fraction of sparse-only's continuation-loss gap closed
MAX_LOSS_DELTA = 0.02          # tuner budget: continuation loss above dense, nats per token

TUNE_LENGTH = 8192             # target prompt length of a tuning job
TUNE_TRIALS = 64               # complete trials of the sparsity study
TUNE_SAMPLES = 8               # tasks per kind per trial
TUNE_BATCH_SIZE = 1            # prompts per prefill: at 1, scoring and timing share one compiled graph
TUNE_TASK_SEED = 0             # the task set's seed: every worker of a study must use the same
MAX_WINDOW_DENSITY = 0.10      # cap on (sink + window) / length in the search space
