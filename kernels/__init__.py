"""Fused Triton kernels behind rlloss's public functions, installed as ``rlloss.kernels``.

Each module mirrors one reference module of ``rlloss`` and holds the ``@triton.jit`` functions,
their launch logic and the ``torch.autograd.Function`` that wraps them. Inputs arrive validated.
"""
