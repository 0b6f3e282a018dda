"""Drop-in integrations of rlloss into trainers, one module per trainer.

``rlloss.integrations.trl`` (``pip install -e ".[trl]"`` in rlloss's checkout): ``GRPOTrainer``, a
subclass of ``trl.GRPOTrainer`` whose loss and advantages come from rlloss.
``rlloss.integrations.verl`` (``pip install -e ".[verl]"`` in rlloss's checkout): registers rlloss's
policy losses and advantage estimators with verl's registries on import (loaded by verl itself
through the ``verl.plugins`` entry point).

This package imports no trainer: each module imports its trainer when it is itself imported, and
names the missing extra when that trainer is not installed.
"""

EXTRAS = {"trl": 'pip install -e ".[trl]"', "verl": 'pip install -e ".[verl]"'}
"""The command that installs each trainer at its tested version, run in the root of rlloss's checkout.

rlloss is not on PyPI yet, so the extras are installed from the checkout (``.``), not by name.
"""


def missing_trainer(trainer: str, exc: ImportError) -> ImportError:
    """The error raised when ``rlloss.integrations.<trainer>`` is imported without its trainer."""
    return ImportError(f"rlloss.integrations.{trainer} needs {trainer}, which failed to import ({exc}); "
                       f"install the tested version with: {EXTRAS[trainer]} (in the root of rlloss's checkout)")
