"""What a new user trips on (issue 18): each mistake is impossible or caught with a message that says what to do.

* group size vs groups: an int as ``groups`` reads as "8 groups" but would mean groups of 8; it is a
  ``TypeError`` naming both spellings everywhere groups are taken, and ``group_size=G`` gives what
  ``groups=`` a tensor of contiguous ids gives;
* padding ids (``-100``) in ``token_logprobs``: with ``mask`` they are never read, give 0 and no
  gradient, on both backends; without it the error says to mask them;
* unshifted causal-LM logits: the error gives the slice to take;
* empty batches: ``metrics["num_tokens"]`` says how much was trained on, metrics stay finite, and an
  ``EmptyBatchWarning`` is issued once per call site where the count is free to read.

Expected values are computed here from plain torch (``log_softmax``), never by the code under test.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rlloss
from helpers import BACKENDS, DEVICE, assert_close
from rlloss import recipes

# =============================================================================================
# group_size= vs groups=
# =============================================================================================

N, G = 8, 4
M8 = torch.ones(N, 3, dtype=torch.bool, device=DEVICE)


def _scores() -> torch.Tensor:
    return torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 3.0, -1.0], device=DEVICE)


def _otb(**grouping):
    r = torch.linspace(-1, 1, N * 3, device=DEVICE).reshape(N, 3)
    old = torch.full((N, 3), -0.7, device=DEVICE)
    return rlloss.optimal_token_baseline_advantages(r, M8, old_logp=old, sum_pi_squared=old.exp(), **grouping)


# Every public entry point that takes groups, as f(**grouping).
GROUPED = {
    "group_advantages": lambda **g: rlloss.group_advantages(_scores(), **g),
    "group_advantages triton": lambda **g: rlloss.group_advantages(_scores(), **g, backend="triton"),
    "dynamic_sampling_mask": lambda **g: rlloss.dynamic_sampling_mask(_scores(), **g),
    "dynamic_sampling_mask triton": lambda **g: rlloss.dynamic_sampling_mask(_scores(), **g, backend="triton"),
    "reinforce_pp_baseline": lambda **g: rlloss.reinforce_pp_baseline_advantages(_scores(), mask=M8, **g),
    "opo": lambda **g: rlloss.opo_advantages(_scores(), mask=M8, **g),
    "gpg": lambda **g: rlloss.gpg_advantages(_scores(), mask=M8, **g),
    "passk": lambda **g: rlloss.passk_advantages(_scores(), mask=M8, **g),
    "gdpo": lambda **g: rlloss.gdpo_advantages(torch.stack([_scores(), _scores() ** 2]), mask=M8, **g),
    "optimal_token_baseline": _otb,
    "Recipe.advantages (GRPO)": lambda **g: recipes.GRPO.advantages(_scores(), **g),
    "Recipe.advantages (Dr. GRPO)": lambda **g: recipes.DR_GRPO.advantages(_scores(), **g),
}
GROUPED_HERE = {k: f for k, f in GROUPED.items() if not k.endswith("triton") or "triton" in BACKENDS}


@pytest.mark.parametrize("name", list(GROUPED_HERE))
@pytest.mark.parametrize("bad", [G, 2, True])
def test_an_int_as_groups_is_a_type_error_naming_both_spellings(name, bad):
    with pytest.raises(TypeError) as info:
        GROUPED_HERE[name](groups=bad)
    message = str(info.value)
    assert f"groups={bad!r} is ambiguous" in message
    assert f"group_size={int(bad)}" in message and "tensor" in message and "group ids" in message


@pytest.mark.parametrize("name", ["group_advantages", "opo", "Recipe.advantages (GRPO)", "dynamic_sampling_mask"])
def test_an_int_given_positionally_is_refused_too(name):
    positional = {
        "group_advantages": lambda: rlloss.group_advantages(_scores(), G),
        "opo": lambda: rlloss.opo_advantages(_scores(), G, M8),
        "Recipe.advantages (GRPO)": lambda: recipes.GRPO.advantages(_scores(), G),
        "dynamic_sampling_mask": lambda: rlloss.dynamic_sampling_mask(_scores(), G),
    }[name]
    with pytest.raises(TypeError, match=f"group_size={G}"):
        positional()


@pytest.mark.parametrize("name", list(GROUPED_HERE))
def test_group_size_gives_what_contiguous_group_ids_give(name):
    fn = GROUPED_HERE[name]
    ids = torch.arange(N, device=DEVICE) // G
    by_size, by_ids = fn(group_size=G), fn(groups=ids)
    if by_size.dtype == torch.bool:
        assert torch.equal(by_size, by_ids)
    else:
        assert_close(by_size, by_ids, torch.float32, what=name)
        # and it is the contiguous grouping, not another: groups of 2 give something else here
        assert not torch.allclose(fn(group_size=2), by_size)


@pytest.mark.parametrize("name", ["group_advantages", "gpg", "optimal_token_baseline", "Recipe.advantages (GRPO)"])
def test_exactly_one_of_groups_and_group_size(name):
    fn = GROUPED[name]
    ids = torch.arange(N, device=DEVICE) // G
    with pytest.raises(TypeError, match="group_size=G for contiguous groups of G, or groups="):
        fn()
    with pytest.raises(TypeError, match="got both"):
        fn(groups=ids, group_size=G)


@pytest.mark.parametrize(
    "grouping, exc, match",
    [
        ({"group_size": 4.0}, TypeError, "group_size must be an int"),
        ({"group_size": torch.tensor(4)}, TypeError, "group_size must be an int"),
        ({"group_size": False}, TypeError, "group_size must be an int"),
        ({"group_size": 0}, ValueError, "group_size must be >= 1"),
        ({"group_size": 3}, ValueError, "group_size=3 does not divide the number of samples N=8"),
        ({"groups": torch.tensor(4)}, TypeError, "0-d tensor"),
        ({"groups": 4.0}, TypeError, "integer tensor"),
        ({"groups": torch.zeros(N)}, TypeError, "integer group ids"),
    ],
)
def test_bad_group_arguments_say_what_was_expected(grouping, exc, match):
    with pytest.raises(exc, match=match):
        rlloss.group_advantages(_scores(), **grouping)
