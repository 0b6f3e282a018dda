"""A training step over rlloss compiles whole: ``torch.compile(fullgraph=True, dynamic=True)``.

The step is a tiny model (embedding, tanh, linear head) giving logits, ``token_logprobs``, then
``policy_loss`` with a k3 KL term and global counts (``num_tokens`` a tensor, ``num_seqs`` a
number); backward runs through the compiled graph (AOT autograd). On both rlloss backends (the
reference, and the Triton ops in the interpreter) it must:

* compile with ``fullgraph=True`` (a graph break is an error);
* give the eager loss and parameter gradients;
* not recompile: a second and third call with other B and T reuse the graph (``dynamic=True``),
  counted by ``torch._dynamo.testing.CompileCounterWithBackend``.

``aot_eager`` and inductor run for both backends, ``aot_eager`` also for ``policy_loss_from_logits``.
Inductor compiles C++ on the CPU (up to a minute on 2 cores per case, cold), so the from-logits step
stays on ``aot_eager``.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import rlloss

V, H = 37, 8
SHAPES = ((3, 5), (4, 7), (2, 9))  # the first compiles; the others must not recompile


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def batch(b: int, t: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(100 * b + t)
    ids = torch.randint(0, V, (b, t), generator=gen)
    old = -torch.rand(b, t, generator=gen) * 3
    ref = old + 0.1 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    mask = torch.rand(b, t, generator=gen) > 0.3
    num_tokens = (mask.sum() + 3).float()  # a global count larger than this micro-batch's
    return ids, old, ref, adv, mask, num_tokens


def step_logprobs(model, ids, old, ref, adv, mask, num_tokens, backend):
    logp = rlloss.token_logprobs(model(ids), ids, temperature=0.9, backend=backend)
    return rlloss.policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.04, num_tokens=num_tokens, num_seqs=8,
                              eps_high=0.28, backend=backend).loss


def step_from_logits(model, ids, old, ref, adv, mask, num_tokens, backend):
    out = rlloss.policy_loss_from_logits(model(ids), ids, old, adv, mask, temperature=0.9, entropy_coef=0.01,
                                         ref_logp=ref, beta=0.04, num_tokens=num_tokens, backend=backend)
    return out.loss + out.metrics["entropy_mean"] * 0  # metrics are outputs of the graph too


def loss_and_grads(fn, model, args, backend):
    model.zero_grad(set_to_none=True)
    loss = fn(model, *args, backend)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def run_case(step, backend: str, compiler: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM()
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for b, t in SHAPES:
        args = batch(b, t)
        loss_c, grads_c = loss_and_grads(compiled, model, args, backend)
        first = counter.frame_count if first is None else first
        loss_e, grads_e = loss_and_grads(step, model, args, backend)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6, msg=f"loss at B={b} T={t}")
        for p, gc, ge in zip(model.state_dict(), grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=f"grad of {p} at B={b} T={t}")
    # the first call may trace twice (dynamo restarts once to turn symbolic floats into tensors)
    assert counter.frame_count == first, f"recompiled for shapes {SHAPES[1:]} after {SHAPES[0]} (dynamic=True)"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_compiles_whole_under_aot_eager(backend):
    run_case(step_logprobs, backend, "aot_eager")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_from_logits_compiles_whole_under_aot_eager(backend):
    run_case(step_from_logits, backend, "aot_eager")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_compiles_whole_under_inductor(backend):
    run_case(step_logprobs, backend, "inductor")


def shaping_step(rewards, lengths, backend):
    shaped = rewards + rlloss.soft_overlong_penalty(lengths, max_len=16, cache_len=4, backend=backend)
    keep = rlloss.dynamic_sampling_mask(shaped, group_size=4, backend=backend)
    return rlloss.group_advantages(shaped, group_size=4, backend=backend) * keep


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_value_checks_do_not_break_the_graph(backend):
    """The per-batch checks that read values (finite rewards, non-negative lengths) become device-side
    asserts while compiling: the shaping step compiles whole, to the eager values, once over sizes."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(shaping_step, backend=counter, fullgraph=True, dynamic=True)
    first = None
    for n in (8, 12, 20):
        gen = torch.Generator().manual_seed(n)
        rewards = torch.randint(0, 2, (n,), generator=gen).float()
        lengths = torch.randint(0, 20, (n,), generator=gen)
        torch.testing.assert_close(compiled(rewards, lengths, backend), shaping_step(rewards, lengths, backend))
        first = counter.frame_count if first is None else first
    assert counter.frame_count == first, "recompiled for another batch size (dynamic=True)"
