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
from strategies import make_problem

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


# =============================================================================================
# token_logprobs(mask=): padding ids are never read
# =============================================================================================

B, T, V = 3, 5, 11


def _logits_and_ids(dtype=torch.float32):
    gen = torch.Generator().manual_seed(18)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype).to(DEVICE)
    ids = torch.randint(0, V, (B, T), generator=gen).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool, device=DEVICE)
    return logits, ids, mask


def _expected(logits, ids, mask, temperature):
    """Plain torch: log_softmax at the valid tokens, 0 elsewhere; the entropy likewise."""
    lsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = lsm.gather(-1, torch.where(mask, ids, 0)[..., None])[..., 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    zero = torch.zeros((), dtype=torch.float64, device=logits.device)
    return torch.where(mask, logp, zero).float(), torch.where(mask, ent, zero).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", [-100, V, 10**9, 3])
def test_masked_ids_are_never_read_and_give_zero_with_zero_gradient(backend, pad):
    logits, ids, mask = _logits_and_ids()
    padded = torch.where(mask, ids, torch.full_like(ids, pad))
    leaf = logits.clone().requires_grad_(True)
    logp, ent = rlloss.token_logprobs(leaf, padded, temperature=0.7, mask=mask, return_entropy=True, backend=backend)
    want_logp, want_ent = _expected(logits, ids, mask, 0.7)
    assert_close(logp, want_logp, torch.float32, what="logp")
    assert_close(ent, want_ent, torch.float32, what="entropy")
    assert torch.equal(logp[~mask], torch.zeros_like(logp[~mask]))
    assert torch.equal(ent[~mask], torch.zeros_like(ent[~mask]))
    (logp.sum() + 0.5 * ent.sum()).backward()
    assert torch.equal(leaf.grad[~mask], torch.zeros_like(leaf.grad[~mask]))  # padding gets no gradient
    assert bool(leaf.grad[mask].abs().sum() > 0)
    # the gradient at valid positions is that of the plain-torch formula
    ref = logits.clone().double().requires_grad_(True)
    lsm = torch.log_softmax(ref / 0.7, dim=-1)
    valid_logp = lsm.gather(-1, torch.where(mask, ids, 0)[..., None])[..., 0]
    ((valid_logp - 0.5 * (lsm.exp() * lsm).sum(-1)) * mask).sum().backward()
    assert_close(leaf.grad, ref.grad.float(), torch.float32, scale=1.0, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_padding_value_does_not_matter_bitwise(backend):
    logits, ids, mask = _logits_and_ids()
    outs = []
    for pad in (-100, 0, V + 7):
        leaf = logits.clone().requires_grad_(True)
        logp = rlloss.token_logprobs(leaf, torch.where(mask, ids, pad), mask=mask.int(), backend=backend)
        logp.sum().backward()
        outs.append((logp.detach(), leaf.grad))
    for logp, grad in outs[1:]:
        assert torch.equal(logp, outs[0][0]) and torch.equal(grad, outs[0][1])


def test_padding_without_a_mask_is_refused_with_the_fix():
    logits, ids, mask = _logits_and_ids()
    with pytest.raises(ValueError, match=r"ids must be in \[0, 11\).*-100.*mask"):
        rlloss.token_logprobs(logits, torch.where(mask, ids, -100))
    # a bad id at a valid position is still an error with a mask
    bad = ids.clone()
    bad[1, 2] = V
    with pytest.raises(ValueError, match=r"got values in \[\d+, 11\]"):
        rlloss.token_logprobs(logits, bad, mask=mask)


def test_token_logprobs_mask_must_match_ids():
    logits, ids, mask = _logits_and_ids()
    with pytest.raises(ValueError, match="mask must have the shape of ids"):
        rlloss.token_logprobs(logits, ids, mask=mask[:, :-1])


# =============================================================================================
# Causal-LM logits: the error says how to slice them
# =============================================================================================


@pytest.mark.parametrize("prompt", [1, 6])
@pytest.mark.parametrize("fn", ["token_logprobs", "policy_loss_from_logits"])
def test_unshifted_causal_logits_get_the_slice_in_the_error(prompt, fn):
    gen = torch.Generator().manual_seed(5)
    completion = 4
    logits = torch.randn(2, prompt + completion, V, generator=gen).to(DEVICE)  # a model's output over the input
    ids = torch.randint(0, V, (2, completion), generator=gen).to(DEVICE)  # the completion's tokens
    call = {
        "token_logprobs": lambda lg: rlloss.token_logprobs(lg, ids),
        "policy_loss_from_logits": lambda lg: rlloss.policy_loss_from_logits(
            lg, ids, None, torch.ones(2, device=DEVICE), torch.ones(2, completion, dtype=torch.bool, device=DEVICE)),
    }[fn]
    with pytest.raises(ValueError) as info:
        call(logits)
    message = str(info.value)
    assert "causal LM" in message and "logits[:, P-1:-1]" in message
    assert f"logits[:, {prompt - 1}:-1]" in message and "logits[:, :-1] with ids = input_ids[:, 1:]" in message
    # the slice the message gives is the right one: completion token j is scored at position P-1+j
    logp = rlloss.token_logprobs(logits[:, prompt - 1:-1], ids)
    lsm = torch.log_softmax(logits.double(), dim=-1)
    want = torch.stack([lsm[:, prompt - 1 + j].gather(-1, ids[:, j:j + 1])[:, 0] for j in range(completion)], 1)
    assert_close(logp, want.float(), torch.float32)


def test_logits_shorter_than_ids_get_no_causal_hint():
    logits = torch.zeros(2, 3, V, device=DEVICE)
    with pytest.raises(ValueError) as info:
        rlloss.token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long, device=DEVICE))
    assert "causal" not in str(info.value)


# =============================================================================================
# metrics["num_tokens"] and the empty-batch warning
# =============================================================================================

RECIPES = [recipes.GRPO, recipes.DAPO, recipes.DR_GRPO, recipes.GSPO, recipes.GMPO_RECIPE]


def _loss(recipe, p, backend, **kw):
    extra = {"max_tokens": p.logp.shape[1]} if recipe.aggregation == "constant" else {}
    if recipe.beta:
        extra["ref_logp"] = p.old_logp
    return recipe.loss(p.logp, p.old_logp, p.adv, p.mask, backend=backend, **extra, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
@pytest.mark.parametrize("mask_kind", ["random", "empty_rows", "all_masked"])
def test_num_tokens_metric_counts_the_valid_tokens_of_the_call(backend, recipe, mask_kind):
    p = make_problem(5, 7, torch.float32, seed=3, mask_kind=mask_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rlloss.EmptyBatchWarning)
        out = _loss(recipe, p, backend if recipe.objective is None else "torch")
        # with the step's count given, the metric is still this call's count
        step = _loss(recipe, p, backend if recipe.objective is None else "torch", num_tokens=1000, num_seqs=50)
    want = int(p.mask.sum())
    for metrics in (out.metrics, step.metrics):
        n = metrics["num_tokens"]
        assert n.dim() == 0 and n.dtype == torch.float32 and not n.requires_grad
        assert n.item() == want
    for name, value in out.metrics.items():  # an empty call's metrics are finite zeros
        assert bool(torch.isfinite(value)), name
        if want == 0:
            assert value.item() == 0.0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_from_logits_reports_num_tokens(backend):
    logits, ids, mask = _logits_and_ids()
    out = rlloss.policy_loss_from_logits(logits, torch.where(mask, ids, -100), None, torch.ones(B, device=DEVICE),
                                         mask, backend=backend)
    assert out.metrics["num_tokens"].item() == int(mask.sum())


def _empty_problem():
    p = make_problem(4, 6, torch.float32, seed=2, mask_kind="all_masked")
    assert not bool(p.mask.any())
    return p


def _record(fn, action="always", category=rlloss.EmptyBatchWarning):
    """The warnings of ``category`` that ``fn()`` issues under the filter ``action``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        fn()
    return [w for w in caught if issubclass(w.category, category)]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the warning reads the count only where it is on the host")
def test_an_empty_cpu_batch_warns_once_per_call_and_names_the_caller():
    p = _empty_problem()
    caught = _record(lambda: rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, backend="torch"))
    assert len(caught) == 1
    assert "no valid token" in str(caught[0].message)
    assert caught[0].filename == __file__  # attributed to the user's line, not to rlloss
    # through the wrappers too: the first frame outside rlloss
    logits = torch.randn(4, 6, V)
    for fn in (lambda: recipes.DAPO.loss(p.logp, p.old_logp, p.adv, p.mask),
               lambda: rlloss.policy_loss_from_logits(logits, torch.full((4, 6), -100), None, p.adv, p.mask)):
        caught = _record(fn)
        assert len(caught) == 1 and caught[0].filename == __file__


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the warning reads the count only where it is on the host")
def test_the_default_filter_shows_it_once_per_call_site_not_per_call():
    p = _empty_problem()

    def loop():
        for _ in range(5):
            rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask)

    assert len(_record(loop, action="default")) == 1


def test_a_non_empty_batch_does_not_warn():
    p = make_problem(4, 6, torch.float32, seed=2, mask_kind="empty_rows")
    assert bool(p.mask.any())
    for backend in BACKENDS:
        assert _record(lambda: rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, backend=backend)) == []
    # an empty micro-batch of a non-empty step (the step's count given) is not an empty batch
    e = _empty_problem()
    assert _record(lambda: rlloss.policy_loss(e.logp, e.old_logp, e.adv, e.mask, num_tokens=12)) == []
    assert _record(lambda: rlloss.distributed.step_counts([p.mask, e.mask])) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_count_of_zero_given_as_a_number_warns_on_every_backend(backend):
    p = make_problem(4, 6, torch.float32, seed=2)
    caught = _record(lambda: rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask, num_tokens=0, backend=backend))
    assert len(caught) == 1 and "num_tokens=0" in str(caught[0].message)
    # from logits too: the fused path runs the loss inside its own op, not through policy_loss
    logits = torch.randn(4, 6, V, device=DEVICE)
    ids = torch.randint(0, V, (4, 6), device=DEVICE)
    caught = _record(lambda: rlloss.policy_loss_from_logits(logits, ids, p.old_logp, p.adv, p.mask, num_tokens=0,
                                                            backend=backend))
    assert len(caught) == 1 and "num_tokens=0" in str(caught[0].message)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="step_counts reads its total only on the host")
def test_step_counts_warns_for_an_empty_step():
    e = _empty_problem()
    caught = _record(lambda: rlloss.distributed.step_counts([e.mask, e.mask[:2]]))
    assert len(caught) == 1 and "whole step" in str(caught[0].message) and caught[0].filename == __file__


def test_the_warning_can_be_filtered_by_its_category():
    assert issubclass(rlloss.EmptyBatchWarning, UserWarning)
    p = _empty_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=rlloss.EmptyBatchWarning)
        out = rlloss.policy_loss(p.logp, p.old_logp, p.adv, p.mask)
    assert out.loss.item() == 0.0


def test_no_warning_and_no_graph_break_under_torch_compile():
    p = _empty_problem()

    def step(logp, old, adv, mask):
        return rlloss.policy_loss(logp, old, adv, mask, backend="torch", aggregation="token_mean")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    caught = _record(lambda: compiled(p.logp, p.old_logp, p.adv, p.mask))
    assert caught == []


# =============================================================================================
# NaN/inf and positive log-probs at valid positions: counted into the metrics, warned about on the CPU
# =============================================================================================

# objective -> the aggregation it takes (GMPO and the per-row ones: seq_mean_token_mean)
SUSPECT_OBJECTIVES = {"ppo": "token_mean", "gspo": "seq_mean_token_mean", "cispo": "token_mean",
                      "vespo": "token_mean", "gmpo": "seq_mean_token_mean"}


def _objective(name):
    return rlloss.PPO(level="sequence") if name == "gspo" else name


def _poisoned(adv_kind, weights_dim, seed=5):
    """A 4x6 problem whose inputs hold NaN, +-inf and positive log-probs at valid and masked positions."""
    p = make_problem(4, 6, torch.float32, seed=seed, adv_kind=adv_kind)
    logp, old, ref, adv = (x.detach().clone().cpu() for x in (p.logp, p.old_logp, p.ref_logp, p.adv))
    for x in (logp, old, ref):
        x.clamp_(max=-1e-2)  # log-probs, so that only the values put below are suspicious
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[3, 2:] = False
    logp[0, 1] = float("nan")
    old[0, 1] = float("inf")  # the same position twice: counted once
    old[1, 4] = float("-inf")
    ref[2, 0] = float("nan")
    logp[1, 0] = 0.5  # positive log-probs
    old[2, 3] = 3.0
    ref[0, 5] = 1e-2
    old[1, 1] = 2.0**-12  # inside the tolerance: rounding, not counted
    for x in (logp, old, ref):  # masked positions: never read, never counted
        x[3, 3] = float("nan")
        x[3, 4] = 7.0
    if adv.dim() == 2:
        adv[2, 5] = float("inf")
        adv[3, 5] = float("nan")
    else:
        adv[3] = float("nan")  # row 3's two valid positions
    weights = None
    if weights_dim == 1:
        weights = torch.ones(4)
        weights[1] = float("inf")  # row 1's six valid positions
    elif weights_dim == 2:
        weights = torch.ones(4, 6)
        weights[2, 2] = float("nan")
        weights[3, 4] = float("inf")  # masked
    return logp, old, ref, adv, mask, weights


def _expected_counts(logp, old, ref, adv, mask, weights):
    """The counts, position by position in plain Python."""
    nonfinite = positive = 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            logps = [float(x[i, t]) for x in (logp, old, ref)]
            values = logps + [float(adv[i, t] if adv.dim() == 2 else adv[i])]
            if weights is not None:
                values.append(float(weights[i, t] if weights.dim() == 2 else weights[i]))
            nonfinite += any(v != v or v in (float("inf"), float("-inf")) for v in values)
            positive += any(v > 2.0**-10 for v in logps)
    return nonfinite, positive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(SUSPECT_OBJECTIVES))
@pytest.mark.parametrize("adv_kind, weights_dim", [("seq", 0), ("token", 2), ("seq", 1)])
def test_nonfinite_and_positive_inputs_are_counted_on_every_backend(backend, objective, adv_kind, weights_dim):
    logp, old, ref, adv, mask, weights = _poisoned(adv_kind, weights_dim)
    want = _expected_counts(logp, old, ref, adv, mask, weights)
    assert want[0] >= 4 and want[1] == 4  # the problem holds what the test is about (+inf is both)
    put = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = rlloss.policy_loss(put(logp), put(old), put(adv), put(mask), objective=_objective(objective),
                                 ref_logp=put(ref), beta=0.1, token_weights=put(weights),
                                 aggregation=SUSPECT_OBJECTIVES[objective], backend=backend)
    for name, count in zip(("nonfinite_inputs", "positive_logp"), want):
        value = out.metrics[name]
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad
        assert value.item() == count, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_clean_inputs_count_zero_and_masked_garbage_is_not_counted(backend):
    p = make_problem(4, 6, torch.float32, seed=2, mask_kind="empty_rows")
    old = torch.where(p.mask, p.old_logp.clamp(max=0.0), float("nan"))
    logp = torch.where(p.mask, p.logp.detach(), 5.0).requires_grad_(True)
    out = rlloss.policy_loss(logp, old, p.adv, p.mask, backend=backend)
    assert out.metrics["nonfinite_inputs"].item() == 0.0 and out.metrics["positive_logp"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logits_counts_what_its_log_probs_carry(backend):
    """The log-probs computed from the logits are <= 0 (no count); a NaN logit at a valid position is counted."""
    logits, ids, mask = _logits_and_ids()
    logits = (logits * 30).detach()  # large logits: the max token's log-prob is 0 up to rounding, never counted
    logits[1, 2, 4] = float("nan")  # a valid position
    logits[0, 4, 0] = float("nan")  # a masked one
    old = torch.full((B, T), -0.5, device=DEVICE)
    old[2, 3] = 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = rlloss.policy_loss_from_logits(logits, ids, old, torch.ones(B, device=DEVICE), mask, backend=backend)
    assert out.metrics["nonfinite_inputs"].item() == 1.0
    assert out.metrics["positive_logp"].item() == 1.0


def _suspicious(fn, action="always"):
    return _record(fn, action, category=rlloss.SuspiciousInputWarning)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the warning reads the counts only where they are on the host")
def test_suspicious_cpu_inputs_warn_once_each_and_name_the_caller():
    logp, old, ref, adv, mask, _ = _poisoned("seq", 0)
    caught = _suspicious(lambda: rlloss.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1))
    assert len(caught) == 2
    assert "NaN or inf" in str(caught[0].message) and "nonfinite_inputs" in str(caught[0].message)
    assert "above 0" in str(caught[1].message) and "positive_logp" in str(caught[1].message)
    assert all(w.filename == __file__ for w in caught)  # the user's line, not rlloss's
    # through the wrappers too, and once per call site under the default filter
    def loop():
        for _ in range(3):
            recipes.DAPO.loss(logp, old, adv, mask)
    caught = _suspicious(loop, action="default")
    assert len(caught) == 2 and all(w.filename == __file__ for w in caught)
    assert issubclass(rlloss.SuspiciousInputWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=rlloss.SuspiciousInputWarning)
        rlloss.policy_loss(logp, old, adv, mask)


def test_clean_inputs_and_the_fused_path_do_not_warn():
    logp, old, ref, adv, mask, _ = _poisoned("seq", 0)
    clean = make_problem(4, 6, torch.float32, seed=2)
    old_clean = clean.old_logp.clamp(max=0.0)
    for backend in BACKENDS:
        assert _suspicious(lambda: rlloss.policy_loss(clean.logp, old_clean, clean.adv, clean.mask,
                                                      backend=backend)) == []
    if "triton" in BACKENDS:  # the fused path never reads its counts back (CUDA's syncs, under the interpreter too)
        args = [x.to(DEVICE) for x in (logp, old, adv, mask)]
        assert _suspicious(lambda: rlloss.policy_loss(*args, backend="triton")) == []


def test_suspicious_inputs_neither_warn_nor_break_the_graph_under_torch_compile():
    logp, old, ref, adv, mask, _ = _poisoned("seq", 0)

    def step(logp, old, adv, mask, ref):
        return rlloss.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    caught = _suspicious(lambda: compiled(logp, old, adv, mask, ref))
    assert caught == []
    out = compiled(logp, old, adv, mask, ref)
    assert out.metrics["nonfinite_inputs"].item() == _expected_counts(logp, old, ref, adv, mask, None)[0]
