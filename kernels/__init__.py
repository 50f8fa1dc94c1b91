"""headplan.kernels: Triton kernels for per-head sparse attention, each beside a PyTorch reference.

Imports no model code. ``patterns`` defines what each head sees; ``reference`` is the plain
PyTorch oracle. Triton modules are imported lazily by the runtime (they need triton and, outside
``TRITON_INTERPRET=1``, a CUDA device).
"""
