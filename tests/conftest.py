"""Test set-up: the device, the backends under test, and the hypothesis profiles.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors, which needs
``TRITON_INTERPRET=1`` before triton is first imported: set here (the README's test command sets it
too). On a CUDA machine run without it and the same tests run the compiled kernels on the GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
