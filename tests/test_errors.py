"""Bad input fails loudly, naming the argument; valid-but-empty input gives finite zeros."""

from __future__ import annotations

import pytest
import torch

import rlloss
from helpers import BACKENDS, DEVICE


def inputs(b=2, t=3):
    logp = torch.full((b, t), -1.0, device=DEVICE, requires_grad=True)
    return logp, logp.detach() - 0.1, torch.ones(b, device=DEVICE), torch.ones(b, t, dtype=torch.bool, device=DEVICE)


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"old_logp": torch.zeros(2, 4)}, ValueError, "old_logp"),
        ({"adv": torch.zeros(3)}, ValueError, "adv"),
        ({"adv": torch.zeros(2, 4)}, ValueError, "adv"),
        ({"mask": torch.ones(2, 1, dtype=torch.bool)}, ValueError, "mask"),
        ({"logp": torch.zeros(6)}, ValueError, "logp"),
        ({"logp": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "logp"),
        ({"adv": [1.0, 2.0]}, TypeError, "adv"),
        ({"aggregation": "sum"}, ValueError, "aggregation"),
        ({"aggregation": "constant"}, ValueError, "max_tokens"),
        ({"aggregation": "constant", "max_tokens": 0}, ValueError, "max_tokens"),
        ({"eps_low": -0.1}, ValueError, "eps_low"),
        ({"eps_high": -0.1}, ValueError, "eps_high"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip"),
        ({"dual_clip": 0.5}, ValueError, "dual_clip"),
        ({"beta": 0.04}, ValueError, "ref_logp"),
        ({"beta": -1.0}, ValueError, "beta"),
        ({"ref_logp": torch.zeros(3, 2), "beta": 0.1}, ValueError, "ref_logp"),
        ({"level": "seq"}, ValueError, "level"),
        ({"num_tokens": -1}, ValueError, "num_tokens"),
        ({"num_seqs": torch.ones(2)}, ValueError, "num_seqs"),
        ({"dp_size": 0}, ValueError, "dp_size"),
        ({"max_log_ratio": 0.0}, ValueError, "max_log_ratio"),
        ({"max_log_ratio": 100.0}, ValueError, "max_log_ratio"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_policy_loss_rejects(change, error, words):
    logp, old, adv, mask = inputs()
    args = {"logp": logp, "old_logp": old, "adv": adv, "mask": mask}
    kw = {}
    for k, v in change.items():
        v = v.to(DEVICE) if isinstance(v, torch.Tensor) else v
        (args if k in args else kw)[k] = v
    with pytest.raises(error, match=words):
        rlloss.policy_loss(args["logp"], args["old_logp"], args["adv"], args["mask"], **kw)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: rlloss.group_advantages(torch.zeros(5), group_size=2), ValueError, "group_size=2 does not divide"),
        (lambda: rlloss.group_advantages(torch.zeros(4), group_size=0), ValueError, "group_size must be >= 1"),
        (lambda: rlloss.group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long)), ValueError, "groups"),
        (lambda: rlloss.group_advantages(torch.zeros(4), torch.zeros(4)), TypeError, "groups"),
        (lambda: rlloss.group_advantages(torch.tensor([1.0, float("nan")]), group_size=2), ValueError, "rewards"),
        (lambda: rlloss.group_advantages(torch.zeros(2, 2), group_size=2), ValueError, "rewards"),
        (lambda: rlloss.group_advantages(torch.zeros(4), group_size=2, baseline="median"), ValueError, "baseline"),
        (lambda: rlloss.group_advantages(torch.zeros(4), group_size=2, scale="global"), ValueError, "scale"),
        (lambda: rlloss.group_advantages(torch.zeros(4), group_size=2, eps=-1e-6), ValueError, "eps"),
        (lambda: rlloss.group_advantages(torch.ones(4), group_size=2, eps=0.0), ValueError, "eps"),
        (lambda: rlloss.group_advantages(torch.zeros(4), group_size=2, singleton="drop"), ValueError, "singleton"),
        (lambda: rlloss.dynamic_sampling_mask(torch.zeros(5), group_size=2), ValueError, "group_size=2 does not divide"),
        (lambda: rlloss.dynamic_sampling_mask(torch.tensor([float("nan"), 1.0]), group_size=2), ValueError, "rewards"),
        (lambda: rlloss.soft_overlong_penalty(torch.tensor([1]), max_len=10, cache_len=20), ValueError, "cache_len"),
        (lambda: rlloss.soft_overlong_penalty(torch.tensor([1]), max_len=10, cache_len=0), ValueError, "cache_len"),
        (lambda: rlloss.soft_overlong_penalty(torch.tensor([-1]), max_len=10, cache_len=5), ValueError, "lengths"),
        (lambda: rlloss.k3_kl(torch.zeros(2, 3), torch.zeros(3, 2)), ValueError, "ref_logp"),
        (lambda: rlloss.kl_estimate(torch.zeros(2), torch.zeros(2), kind="k4"), ValueError, "kind"),
        (lambda: rlloss.masked_mean(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
        (lambda: rlloss.masked_mean(torch.zeros(2, 3), torch.ones(2, 3), dim=2), ValueError, "dim"),
        (lambda: rlloss.masked_mean(torch.zeros(2, 3), torch.ones(2, 3), normalizer=-1.0), ValueError, "normalizer"),
        (lambda: rlloss.masked_mean(torch.zeros(2, 3), torch.ones(2, 3), 1, normalizer=torch.ones(3)), ValueError,
         "normalizer"),
    ],
)
def test_helpers_reject(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_masked_batch_is_finite_zero_with_zero_gradient(backend, aggregation, level):
    logp, old, adv, mask = inputs()
    kw = {"max_tokens": 8} if aggregation == "constant" else {}
    out = rlloss.policy_loss(logp, old, adv, torch.zeros_like(mask), aggregation=aggregation, level=level,
                             ref_logp=old, beta=0.1, backend=backend, **kw)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(v.item() == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_global_counts_give_zero_not_nan(backend):
    logp, old, adv, mask = inputs()
    for kw in ({"num_tokens": 0}, {"num_seqs": 0, "aggregation": "seq_mean_token_sum"}):
        out = rlloss.policy_loss(logp, old, adv, mask, backend=backend, **kw)
        (grad,) = torch.autograd.grad(out.loss, logp)
        assert out.loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_empty_batches_of_the_helpers_are_valid():
    empty = torch.zeros(0, device=DEVICE)
    assert rlloss.group_advantages(empty, group_size=1).shape == (0,)
    assert rlloss.dynamic_sampling_mask(empty, group_size=1).shape == (0,)
    assert rlloss.soft_overlong_penalty(empty.long(), max_len=4, cache_len=2).shape == (0,)
    out = rlloss.policy_loss(torch.zeros(0, 3, device=DEVICE), None, empty, torch.zeros(0, 3, dtype=torch.bool, device=DEVICE))
    assert out.loss.item() == 0.0


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logp, old, adv, mask = inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rlloss.policy_loss(logp.cpu(), old.cpu(), adv.cpu(), mask.cpu(), backend="triton")


def test_mismatched_devices_are_named():
    logp, old, adv, mask = inputs()
    with pytest.raises(ValueError, match="old_logp on meta"):  # the meta device needs no GPU
        rlloss.policy_loss(logp, old.to("meta"), adv, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["logp", "old_logp", "ref_logp"])
def test_nan_at_a_valid_token_surfaces(backend, where):
    """NaN where the mask says valid is an upstream bug: both backends must show it, not hide it."""
    logp, old, adv, mask = inputs()
    values = {"logp": logp.detach().clone(), "old_logp": old.clone(), "ref_logp": old.clone()}
    values[where][0, 1] = float("nan")
    out = rlloss.policy_loss(values["logp"], values["old_logp"], adv, mask, ref_logp=values["ref_logp"], beta=0.04,
                             dual_clip=3.0, backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mean_over_an_empty_dimension(backend):
    x = torch.zeros(3, 0, device=DEVICE)
    got = rlloss.masked_mean(x, torch.zeros(3, 0, dtype=torch.bool, device=DEVICE), dim=-1, backend=backend)
    assert torch.equal(got, torch.zeros(3, device=DEVICE))
