"""Run the real Triton kernels on CPU tensors: the interpreter must be on before Triton compiles them."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist, each worker and the CLI subprocesses it starts get their share of the cores:
# OpenMP threads of several workers spinning on the same cores slow the whole suite down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
