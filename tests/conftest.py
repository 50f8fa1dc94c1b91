"""Test setup: Triton kernels run under the interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any @triton.jit module is imported, so it is set here, at
collection time, before the tests import headplan.kernels.*.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
