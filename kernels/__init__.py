"""Fused Triton kernels behind rlloss's public functions, installed as ``rlloss.kernels``.

Each module mirrors one reference module of ``rlloss`` and holds the ``@triton.jit`` functions and
their launch logic as plain functions of tensors and numbers; ``ops`` registers them as the
``torch.ops.rlloss.*`` custom ops (fake implementations, registered autograd) that the public
functions call. Inputs arrive validated.

Layering, one direction: leaves (``rlloss._constants``, ``rlloss._groups``: numbers, code tables,
group indexing) <- these modules (torch, triton and the leaves only, imported at module level) <-
the dispatch layer (``rlloss._fused``: objectives to codes, the fp64 and unsupported-objective
fallbacks) and the public modules <- ``rlloss/__init__``. Being a subpackage, ``rlloss.kernels`` is
imported after ``rlloss/__init__`` has run; what the kernels themselves import is checked by
``tests/test_layering.py`` in an interpreter where ``rlloss`` is a bare package.
"""
