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

The name ``kernels``: from a checkout's root (``python -m pytest``, ``python -c``, a REPL) this
folder is first on ``sys.path`` and would be imported as the top-level package ``kernels``, which is
Hugging Face's (``transformers`` imports it). So this file, run under that name, hands the import on
to the next ``kernels`` on ``sys.path`` (or raises ``ModuleNotFoundError`` as if this folder were not
there): the folder is only ever ``rlloss.kernels``.
"""

if __name__ == "kernels":  # imported top-level from the checkout's root: not ours to answer
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout])
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (rlloss's kernels/ folder is rlloss.kernels, "
                                  "not a top-level package)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
