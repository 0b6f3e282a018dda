"""Test set-up: the device, the backends under test, and the hypothesis profiles.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors, which needs
``TRITON_INTERPRET=1`` before triton is first imported: set here (the README's test command sets it
too). On a CUDA machine run without it and the same tests run the compiled kernels on the GPU.
``TRITON_INTERPRET=0`` on a machine without CUDA is a usage error, not a run that skips every kernel.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] in ("", "0"):
        # Without CUDA and without the interpreter every kernel test would be skipped: a green run
        # that tested no kernel. Say so instead.
        raise pytest.UsageError(
            f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']!r} on a machine without CUDA: the Triton kernel "
            "tests can only run in Triton's interpreter here, and would all be skipped. Unset TRITON_INTERPRET "
            "or set it to 1 (on a CUDA machine, run without it)."
        )

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# ci: the same examples every run (a red CI is a regression, never a newly drawn case); thorough:
# random, many more examples, for GPU and local deep runs where new cases are what is wanted.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# explicit: only the @example cases (and pytest's parametrised ones), no drawn example at all. What
# tools/mutate.py runs: a mutant killed under it is killed by cases written in the tests, whichever hypothesis
# version pip resolved (the ci profile's draws change with the version).
settings.register_profile(
    "explicit",
    deadline=None,
    phases=(Phase.explicit,),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _pause_coverage_inside_interpreted_kernels() -> None:
    """While coverage measures a run (``.ci/run``), pause it for the length of each kernel Triton's interpreter
    runs. Coverage measures ``rlloss/`` only; an interpreted kernel runs ``kernels/`` and Triton's own Python, none
    of it measured, yet with a trace function set every Python call and line of it runs slower: measured on this
    2-core CPU, tests/test_logits_fused.py and tests/test_oracles.py took 1.9x their time under coverage, 1.1x
    with this pause. Nothing a kernel runs calls back into ``rlloss/``: the report is the same, line for line
    (checked on those two files). A no-op without coverage, and on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import coverage
    except ImportError:
        return
    if coverage.Coverage.current() is None:
        return  # not measuring: nothing to pause, and triton stays unimported until a test needs it
    from triton.runtime.interpreter import GridExecutor
    launch = GridExecutor.__call__

    def launch_untraced(self, *args, **kwargs):
        # the same tracer object back: the frames it traces go on reporting their lines (coverage's tracer
        # supports being handed back through sys.settrace); a new one (Coverage.stop/start) would lose them
        tracer = sys.gettrace()
        sys.settrace(None)
        try:
            return launch(self, *args, **kwargs)
        finally:
            sys.settrace(tracer)

    GridExecutor.__call__ = launch_untraced


_pause_coverage_inside_interpreted_kernels()
