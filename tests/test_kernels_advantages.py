"""Triton kernels of ``group_advantages``, ``dynamic_sampling_mask`` and ``soft_overlong_penalty``
against the PyTorch reference, through the public functions, values and gradients.

Groups are drawn as an int size (contiguous) or as shuffled id tensors with arbitrary id values and
sizes; each group's rewards are 0/1, continuous, or all equal; groups of one and groups longer
than a kernel tile (1024) are drawn too. All-equal groups hold dyadic values: their sums and
means are exact in fp32, so both backends see a standard deviation of exactly 0 (with values that
do not sum exactly, the rounding of the mean decides between a std of 0 and one of ~1e-8, and the
advantage ``~1e-8 / (1e-8 + eps)`` is rounding noise in either backend).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlloss
from helpers import DEVICE, assert_close, triton_runs_here

pytestmark = [
    pytest.mark.skipif(not triton_runs_here(), reason="Triton cannot run here (no CUDA, no interpreter)"),
    # fp16 gradients of all-equal groups overflow to inf, as the reference's do: numpy (the
    # interpreter) warns about that cast
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REWARD_KINDS = ("binary", "continuous", "all_equal")
EQUAL_VALUES = (0.0, 1.0, -0.5, 0.75, 3.0)  # dyadic: sums of a few of them are exact in fp32
BASELINES = ("mean", "loo")
SCALES = ("group", "batch", "none")
SINGLETONS = ("zero", "keep")


@dataclasses.dataclass
class RewardProblem:
    """Rewards ``[N]`` (a view of ``leaf``, strided or not), their groups, and each sample's group."""

    leaf: torch.Tensor
    stride: int
    groups: int | torch.Tensor
    group_of: torch.Tensor  # [N] dense 0..k-1, for the checks only
    equal: torch.Tensor  # [k] bool: the group is all-equal by construction
    description: str

    def rewards(self, leaf: torch.Tensor | None = None) -> torch.Tensor:
        return (self.leaf if leaf is None else leaf)[:: self.stride]

    @property
    def dtype(self) -> torch.dtype:
        return self.leaf.dtype

    @property
    def grouping(self) -> dict[str, int | torch.Tensor]:
        """The keyword the public functions take: ``group_size=G`` (contiguous) or ``groups=ids``."""
        return {"group_size": self.groups} if isinstance(self.groups, int) else {"groups": self.groups}

    @property
    def k(self) -> int:
        return int(self.equal.numel())


def make_rewards(sizes: list[int], kinds: list[str], dtype: torch.dtype, seed: int, contiguous: bool,
                 strided: bool = False) -> RewardProblem:
    gen = torch.Generator().manual_seed(seed)
    values, group_of = [], []
    for g, (size, kind) in enumerate(zip(sizes, kinds)):
        if kind == "binary":
            v = torch.randint(0, 2, (size,), generator=gen).float()
        elif kind == "continuous":
            v = torch.randn(size, generator=gen) * 2 + 0.5
        else:
            v = torch.full((size,), EQUAL_VALUES[int(torch.randint(0, len(EQUAL_VALUES), (1,), generator=gen))])
        values.append(v)
        group_of.append(torch.full((size,), g))
    r, group_of = torch.cat(values), torch.cat(group_of)
    if contiguous:
        groups: int | torch.Tensor = sizes[0]
    else:  # verl's layout: arbitrary ids (negative, sparse) in any order
        id_values = torch.randperm(10_000, generator=gen)[: len(sizes)] - 5_000
        perm = torch.randperm(r.numel(), generator=gen)
        r, group_of = r[perm], group_of[perm]
        groups = id_values[group_of].to(DEVICE)
    stride = 2 if strided else 1
    leaf = torch.zeros(r.numel() * stride, dtype=dtype)
    leaf[::stride] = r.to(dtype)
    leaf = leaf.to(DEVICE).requires_grad_(True)
    equal = torch.tensor([kind == "all_equal" for kind in kinds])
    layout = f"G={groups}" if contiguous else "ids"
    return RewardProblem(leaf, stride, groups, group_of.to(DEVICE), equal.to(DEVICE),
                         f"sizes={sizes} kinds={kinds} {dtype} {layout} strided={strided} seed={seed}")


def group_sizes() -> st.SearchStrategy[int]:
    """Mostly small groups (1 is a singleton), sometimes longer than one kernel tile of 1024."""
    return st.one_of(st.integers(1, 9), st.sampled_from([1, 16, 33, 1025]))


@st.composite
def reward_problems(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> RewardProblem:
    contiguous = draw(st.booleans(), label="contiguous")
    if contiguous:
        sizes = [draw(group_sizes(), label="G")] * draw(st.integers(1, 8), label="groups")
    else:
        sizes = draw(st.lists(group_sizes(), min_size=1, max_size=8), label="sizes")
    if sum(sizes) > 3000:  # keeps the interpreter quick; long groups are still drawn
        sizes = sizes[:2]
    kinds = draw(st.lists(st.sampled_from(REWARD_KINDS), min_size=len(sizes), max_size=len(sizes)), label="kinds")
    return make_rewards(sizes, kinds, draw(st.sampled_from(dtypes), label="dtype"),
                        draw(st.integers(0, 2**31 - 1), label="seed"), contiguous,
                        strided=draw(st.booleans(), label="strided"))


def advantages_and_grad(problem: RewardProblem, backend: str, cot: torch.Tensor, **kw):
    leaf = problem.leaf.detach().clone().requires_grad_(True)
    adv = rlloss.group_advantages(problem.rewards(leaf), **problem.grouping, backend=backend, **kw)
    (grad,) = torch.autograd.grad(adv, leaf, cot)
    return adv.detach(), grad[:: problem.stride]


def std_path(cot: torch.Tensor, adv: torch.Tensor, r: torch.Tensor, denom: float) -> float:
    """Size of the gradient that reaches one sample through a std over the rewards ``r``:
    ``sum |dA * A| / D * max |r - mean| / ((n-1) std)`` (0 where the std is 0)."""
    n = r.numel()
    std = float(r.std()) if n > 1 else 0.0
    if std == 0.0:
        return 0.0
    return float((cot * adv).abs().sum()) / denom * float((r - r.mean()).abs().max()) / ((n - 1) * std)


def check_advantages(problem: RewardProblem, baseline: str, scale: str, singleton: str, eps: float, seed: int) -> None:
    """Values (fp32) and gradients (the rewards' dtype) of both backends, group by group.

    A reordered sum changes a mean by a few ulps of the group's largest reward, and the advantage
    divides that by the group's denominator ``D``: that is the scale a value's error is relative
    to. A gradient adds terms that partly cancel (for a group of two, exactly: its advantages are
    +-1/sqrt(2) whatever the rewards), so its error is relative to their magnitudes: up to
    ``3 max |dA| / D`` through the baseline, and the std path of the group or of the batch.
    """
    kw = {"baseline": baseline, "scale": scale, "singleton": singleton, "eps": eps}
    n = problem.group_of.numel()
    cot = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    adv, grad = advantages_and_grad(problem, "triton", cot, **kw)
    adv_ref, grad_ref = advantages_and_grad(problem, "torch", cot, **kw)
    assert adv.dtype == torch.float32 and adv.shape == (n,), problem.description
    assert grad.dtype == problem.dtype, problem.description
    # fp16 gradients of an all-equal group (|dA| / eps ~ 1e6) overflow to inf in both backends
    assert torch.isfinite(adv).all() and not torch.isnan(grad).any(), problem.description
    r = problem.rewards().detach().float()
    what = f"{problem.description} {kw}"
    batch_denom = (float(r.std()) if n > 1 else 0.0) + eps
    batch_terms = std_path(cot, adv_ref, r, batch_denom) if scale == "batch" else 0.0
    for g in range(problem.k):
        sel = problem.group_of == g
        size = int(sel.sum())
        if scale == "group":
            d = float(r[sel].std()) + eps if size > 1 else 1.0
        else:
            d = batch_denom if scale == "batch" else 1.0
        if bool(problem.equal[g]) and size > 1:  # exact statistics: exactly 0 in both
            assert not bool(adv[sel].any()) and not bool(adv_ref[sel].any()), what
        assert_close(adv[sel], adv_ref[sel], torch.float32, scale=float(r[sel].abs().max()) / d,
                     what=f"A, group {g}: {what}")
        group_terms = std_path(cot[sel], adv_ref[sel], r[sel], d) if scale == "group" else 0.0
        grad_scale = 3 * float(cot[sel].abs().max()) / d + group_terms + batch_terms
        assert_close(grad[sel], grad_ref[sel], problem.dtype, scale=grad_scale, what=f"dA/dr, group {g}: {what}")


@given(problem=reward_problems(), baseline=st.sampled_from(BASELINES), scale=st.sampled_from(SCALES),
       singleton=st.sampled_from(SINGLETONS), eps=st.sampled_from([1e-6, 1e-4, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_group_advantages_triton_matches_torch(problem, baseline, scale, singleton, eps, seed):
    check_advantages(problem, baseline, scale, singleton, eps, seed)


@pytest.mark.parametrize("contiguous", [True, False], ids=["int_G", "ids"])
@pytest.mark.parametrize("singleton", SINGLETONS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("baseline", BASELINES)
def test_every_option_on_every_kind_of_group(baseline, scale, singleton, contiguous):
    """Each option combination, each run, on groups of every kind (with ids: singletons as well)."""
    if contiguous:
        sizes, kinds = [4] * 6, ["binary", "continuous", "all_equal", "binary", "continuous", "all_equal"]
    else:
        sizes = [1, 1, 4, 2, 7, 3, 5]
        kinds = ["continuous", "all_equal", "binary", "continuous", "all_equal", "continuous", "binary"]
    for dtype in FLOAT_DTYPES:
        check_advantages(make_rewards(sizes, kinds, dtype, seed=7, contiguous=contiguous), baseline, scale,
                         singleton, 1e-6, seed=3)


@pytest.mark.parametrize("scale", SCALES)
def test_long_and_many_groups(scale):
    """Segments longer than a tile (several steps per program) and more groups than one program packs."""
    long = make_rewards([2500, 1, 1030, 3], ["continuous", "continuous", "binary", "all_equal"], torch.float32,
                        seed=11, contiguous=False)
    many = make_rewards([2] * 700, ["binary", "continuous", "all_equal", "continuous"] * 175, torch.bfloat16,
                        seed=12, contiguous=True)
    for problem in (long, many):
        for baseline in BASELINES:
            check_advantages(problem, baseline, scale, "keep", 1e-6, seed=5)


def test_all_equal_group_gives_exact_zeros_and_zero_gradient_for_a_uniform_upstream():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 2.0], device=DEVICE, requires_grad=True)
    adv = rlloss.group_advantages(rewards, group_size=3, backend="triton")
    assert torch.equal(adv[:3], torch.zeros(3, device=DEVICE))
    adv[:3].sum().backward()
    assert torch.equal(rewards.grad, torch.zeros(6, device=DEVICE))


@pytest.mark.parametrize("groups", [1, "ids"])
def test_empty_input(groups):
    rewards = torch.zeros(0, device=DEVICE, requires_grad=True)
    g = {"groups": torch.zeros(0, dtype=torch.long, device=DEVICE)} if groups == "ids" else {"group_size": groups}
    adv = rlloss.group_advantages(rewards, **g, backend="triton")
    assert adv.shape == (0,) and adv.dtype == torch.float32
    adv.sum().backward()
    assert rewards.grad.shape == (0,)
    assert rlloss.dynamic_sampling_mask(rewards.detach(), **g, backend="triton").shape == (0,)
    assert rlloss.soft_overlong_penalty(rewards.detach().long(), max_len=4, cache_len=2, backend="triton").shape == (0,)


def test_fp64_rewards_stay_fp64():
    rewards = torch.tensor([0.3, 1.2, -0.5, 2.0], dtype=torch.float64, device=DEVICE)
    assert rlloss.group_advantages(rewards, group_size=2, backend="triton").dtype == torch.float64


def test_triton_backend_is_deterministic():
    """Two runs, bitwise equal values and gradients (fixed-order reductions, no atomics)."""
    problems = [
        make_rewards([2500, 1, 1030, 3, 6], ["continuous", "continuous", "binary", "all_equal", "continuous"],
                     torch.float32, seed=21, contiguous=False),
        make_rewards([3] * 400, ["continuous", "binary"] * 200, torch.bfloat16, seed=22, contiguous=True),
    ]
    for problem in problems:
        n = problem.group_of.numel()
        cot = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        for scale in SCALES:
            kw = {"baseline": "loo", "scale": scale, "singleton": "keep"}
            first = advantages_and_grad(problem, "triton", cot, **kw)
            second = advantages_and_grad(problem, "triton", cot, **kw)
            assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), problem.description
        r = problem.rewards().detach()
        mask = rlloss.dynamic_sampling_mask(r, **problem.grouping, backend="triton")
        assert torch.equal(mask, rlloss.dynamic_sampling_mask(r, **problem.grouping, backend="triton"))


# --- dynamic sampling ----------------------------------------------------------------------------

@given(problem=reward_problems(), as_dtype=st.sampled_from([None, torch.bool, torch.int64, torch.uint8, torch.float64]))
def test_dynamic_sampling_mask_triton_matches_torch(problem, as_dtype):
    r = problem.rewards().detach()
    if as_dtype is torch.bool or as_dtype is torch.uint8:
        r = r != 0  # 0/1 groups stay mixed or equal; a nonzero constant group stays equal
        r = r if as_dtype is torch.bool else r.to(torch.uint8)
    elif as_dtype is not None:
        r = (r * 4).to(as_dtype)  # the dyadic values stay distinct as integers
    got = rlloss.dynamic_sampling_mask(r, **problem.grouping, backend="triton")
    expected = rlloss.dynamic_sampling_mask(r, **problem.grouping, backend="torch")
    assert got.dtype == torch.bool and got.shape == expected.shape, problem.description
    assert torch.equal(got, expected), problem.description
    equal_groups = problem.equal[problem.group_of]
    assert not bool(got[equal_groups].any()), problem.description


def test_dynamic_sampling_mask_compares_in_the_reference_dtype():
    """int64 rewards that fp32 cannot tell apart are equal in both backends; inf is a value."""
    big = torch.tensor([2**24, 2**24 + 1, 5, 6], dtype=torch.int64, device=DEVICE)
    inf = torch.tensor([float("inf"), float("inf"), float("-inf"), 1.0, float("inf"), 0.0], device=DEVICE)
    ids = torch.tensor([3, 3, -1, -1, 8, 8], device=DEVICE)
    for r, g in ((big, {"group_size": 2}), (inf, {"group_size": 2}), (inf, {"groups": ids})):
        assert torch.equal(rlloss.dynamic_sampling_mask(r, **g, backend="triton"),
                           rlloss.dynamic_sampling_mask(r, **g, backend="torch"))


# --- soft overlong penalty -----------------------------------------------------------------------

LENGTH_DTYPES = (torch.int64, torch.int32, torch.int16, torch.float32, torch.bfloat16, torch.float16, torch.float64)


@given(max_len=st.one_of(st.integers(1, 300), st.sampled_from([20480, 2**24 + 3])), data=st.data(),
       factor=st.sampled_from([1.0, 0.0, 0.5, 1 / 3, 2.5]), dtype=st.sampled_from(LENGTH_DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_soft_overlong_penalty_triton_matches_torch(max_len, data, factor, dtype, seed):
    cache_len = data.draw(st.one_of(st.integers(1, max_len), st.sampled_from([1, min(4096, max_len), max_len])),
                          label="cache_len")
    start = max_len - cache_len
    edges = [0, 1, start - 1, start, start + 1, (start + max_len) // 2, max_len - 1, max_len, max_len + 1,
             2 * max_len + 7]
    rand = torch.randint(0, 2 * max_len + 2, (37,), generator=torch.Generator().manual_seed(seed))
    lengths = torch.cat([torch.tensor([e for e in edges if e >= 0]), rand])
    limit = {torch.int16: 2**15 - 1, torch.float16: 65504}.get(dtype)
    if limit is not None:
        lengths = lengths.clamp(max=limit)
    lengths = lengths.to(dtype).to(DEVICE)
    kw = {"max_len": max_len, "cache_len": cache_len, "factor": factor}
    got = rlloss.soft_overlong_penalty(lengths, backend="triton", **kw)
    expected = rlloss.soft_overlong_penalty(lengths, backend="torch", **kw)
    what = f"{dtype} {kw}"
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == out_dtype, what
    assert_close(got, expected, out_dtype, what=what)
    if DEVICE.type == "cpu":  # the interpreter does the reference's fp32 operations in its order
        assert torch.equal(got, expected), what
