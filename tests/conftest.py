"""Run the real Triton kernels on CPU tensors: the interpreter must be on before Triton compiles them."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
