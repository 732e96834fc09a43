"""The accuracy targets of the harness and the tuner's default budget: plain numbers, importable without torch
(the CLI's --help states them)."""

RETRIEVAL_TARGET = 0.95        # passkey and multi-key accuracy as a fraction of dense
LOSS_GAP_TARGET = 0.75         # fraction of sparse-only's continuation-loss gap closed
MAX_LOSS_DELTA = 0.02          # tuner budget: continuation loss above dense, nats per token
