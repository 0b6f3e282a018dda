"""Every keyword of the public API takes a non-default value in a test whose expected result is an oracle's.

The rule (issue 26) covers every keyword with a default of every public function, class and method
(``rlloss.__all__``, ``rlloss.distributed``, the presets' methods, ``rlloss.audit``), every field of
the objectives and of ``Recipe``, the TRL trainer's own keywords, the ``GRPOConfig`` fields and
``loss_type`` values ``rlloss.integrations.trl`` translates, and the verl config fields, loss modes,
aggregation modes and estimators ``rlloss.integrations.verl`` translates or registers. For each, a
test sets a value other than the default and compares the result with an oracle: a float64 loop
written from SPEC, a value worked by hand, the trainer's own code path (TRL, verl), or, for the
Triton path, the PyTorch reference.

How it is enforced. ``COVERED`` maps each keyword to the test(s) that are the evidence, and
``ORACLES`` names each such test's oracle (per file, or per test where a file mixes kinds). This
module checks, statically, on every run of the suite:

* both ways, that ``COVERED`` lists exactly the keywords the API has today, read from the
  signatures and dataclass fields, and for the integrations from their source (the ``_get(config,
  "field")`` reads and registries of ``rlloss.integrations.verl``; in the trainers' environment
  also the ``GRPOConfig`` fields ``rlloss.integrations.trl`` reads). A new keyword fails here until
  a test is named for it; a removed one until its entry goes;
* that each named test exists, has an oracle in ``ORACLES``, and sets the keyword in the code it
  runs from the test modules (the test with its decorators, and the module-level functions and
  tables it names, transitively, in its module and the sibling modules it imports), while naming
  the keyword's function: as ``keyword=value`` in a call of that function, of a helper or of a
  ``dict(...)``, a ``"keyword": value`` entry, a parametrised argument, the keyword's position in a
  call, or, for an option's value (a ``loss_type``, a ``loss_mode``), the value itself; a literal
  equal to the default does not count. A test rewritten so that it no longer sets the keyword
  fails here, by name. The check is a static reading, not a proof: a call counts as one of the
  function's when the function is named at it, or when the called name was taken from a table
  (``fn, kwargs = TABLE[name]``, a loop over one), never a parameter, an import or a local ``def``
  or lambda; but a ``"keyword": value`` entry or a ``dict(keyword=value)`` counts wherever it
  stands in that code, even in a table entry that belongs to another function with a keyword of the
  same name (a ``low`` of CISPO's beside DPPO's). Whether a test compares with an oracle is the
  registry's word (``ORACLES``), checked by review, not by this code.

Why a registry read statically rather than a recorder at run time (a profiler hook noting the
keywords each public call receives): a recorder sees only what a full run of both environments
executes, at a cost in every call of every test, and it cannot tell a test that compares with an
oracle from one that only runs the code; the registry names the evidence and its oracle where a
reviewer reads them, and its check takes seconds in any run of this file. What it cannot see (a
keyword set and then not reaching the arithmetic), branch coverage measured by CI and the
mutation script see (``.ci/run``: at least 95% of the statements and branches of ``rlloss/``).

Two more lists, each entry with its reason: ``NOT_OPTIONS``, what the integrations' source reads
that only carries options (verl's ``global_batch_info``); ``PENDING``, a keyword whose test is known
to be missing, reported as an expected failure on every run (``-ra`` lists it) until the test is
named in ``COVERED``, and then the entry must go (a keyword in two lists fails).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import rlloss
import rlloss.audit
import rlloss.distributed

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
VALUE = "<an option's value>"  # the "default" of an option value: the value itself must appear in the test


class Keyword(NamedTuple):
    owner: str  # "rlloss.policy_loss", "rlloss.PPO", "trl.GRPOConfig", "verl loss_mode", ...
    name: str
    default: Any  # the default value, VALUE for an option value, or inspect.Parameter.empty when unknown
    position: int | None  # where a call may pass it positionally, None if keyword-only
    call: str | None  # its function's name, which the test must mention ("policy_loss", "PPO", "GRPOConfig")

    @property
    def key(self) -> str:
        return f"{self.owner}:{self.name}"


# ----------------------------------------------------------------------------------------------
# The keywords the API has today
# ----------------------------------------------------------------------------------------------


def _parameters(owner: str, obj: Any, call: str | None, skip_self: bool = False) -> list[Keyword]:
    """The parameters of ``obj`` that have a default (the others are always given)."""
    out = []
    params = list(inspect.signature(obj).parameters.values())
    if skip_self:
        params = params[1:]
    for position, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        out.append(Keyword(owner, p.name, p.default, position if positional else None, call))
    return out


def _class_keywords(prefix: str, cls: type) -> list[Keyword]:
    """A dataclass's or NamedTuple's fields with defaults, and its public methods' keywords."""
    out = _parameters(f"{prefix}.{cls.__name__}", cls, cls.__name__)
    for name, member in sorted(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            out += _parameters(f"{prefix}.{cls.__name__}.{name}", member, name, skip_self=True)
    return out


def _module_keywords(prefix: str, module: Any) -> list[Keyword]:
    out = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj) or (isinstance(obj, type) and issubclass(obj, Warning)):
            continue  # the submodules have their own entries; a warning class has no options
        if inspect.isfunction(obj):
            out += _parameters(f"{prefix}.{name}", obj, name)
        elif isinstance(obj, type):
            out += _class_keywords(prefix, obj)
    return out


def library_keywords() -> list[Keyword]:
    """``rlloss.__all__``, ``rlloss.distributed.__all__``, ``rlloss.audit.__all__``: functions, the
    dataclasses' fields (objectives, ``Recipe``) and their public methods (the presets' methods)."""
    return (_module_keywords("rlloss", rlloss) + _module_keywords("rlloss.distributed", rlloss.distributed)
            + _module_keywords("rlloss.audit", rlloss.audit))


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _constant(node: ast.AST | None) -> Any:
    """The value of a literal (a negative number included), else ``inspect.Parameter.empty``."""
    try:
        return ast.literal_eval(node) if node is not None else inspect.Parameter.empty
    except ValueError:
        return inspect.Parameter.empty


def _function_defaults(fn: ast.FunctionDef) -> dict[str, Any]:
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]],
                        [_constant(d) for d in args.defaults]))
    defaults.update({a.arg: _constant(d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
    return defaults


def _string_items(node: ast.AST) -> list[str]:
    """The string keys of a dict literal or the strings of a tuple/list literal."""
    if isinstance(node, ast.Dict):
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def _module_constant(tree: ast.Module, name: str) -> ast.AST:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node.value
    raise LookupError(name)


def verl_keywords() -> list[Keyword]:
    """What ``rlloss.integrations.verl`` reads or registers, from its source (verl need not be installed).

    The config fields it reads (``_get(config, "field", default)``, ``info.get("field")``), the
    keywords of the policy-loss function it registers and of its estimators, its loss modes and
    estimators (``rlloss_<name>``), and the ``loss_agg_mode`` values ``verl_normalizer`` handles.
    """
    tree = _tree(ROOT / "rlloss" / "integrations" / "verl.py")
    estimators = {"_grouped", "_opo", "_gpg", "_reinforce_pp", "_reinforce_pp_baseline", "_remax"}
    out: dict[str, Keyword] = {}
    for top in tree.body:  # a field read by an estimator is set through verl's AlgoConfig, else its ActorConfig
        context = "get_adv_estimator_fn" if getattr(top, "name", None) in estimators else "ppo_loss"
        for node in ast.walk(top):
            if not isinstance(node, ast.Call) or len(node.args) < 1:
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "_get" and len(node.args) >= 2:
                field = _constant(node.args[1])
                default = _constant(node.args[2]) if len(node.args) > 2 else None
            elif isinstance(func, ast.Attribute) and func.attr == "get" and isinstance(func.value, ast.Name) \
                    and func.value.id == "info":
                field, default = _constant(node.args[0]), None
            else:
                continue
            if isinstance(field, str) and field not in out:
                out[field] = Keyword("verl config", field, default, None, context)
    keywords = list(out.values())
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name == "policy_loss_fn":
            keywords += [Keyword("verl policy loss", k, d, None, "ppo_loss") for k, d in _function_defaults(fn).items()]
        if isinstance(fn, ast.FunctionDef) and fn.name in estimators - {"_grouped"} | {"estimator"}:
            for k, d in _function_defaults(fn).items():
                if all(kw.name != k for kw in keywords if kw.owner == "verl estimator"):
                    keywords.append(Keyword("verl estimator", k, d, None, "get_adv_estimator_fn"))
    keywords += [Keyword("verl loss_mode", f"rlloss_{n}", VALUE, None, "ppo_loss")
                 for n in _string_items(_module_constant(tree, "POLICY_LOSSES"))]
    keywords += [Keyword("verl adv_estimator", f"rlloss_{n}", VALUE, None, "get_adv_estimator_fn")
                 for n in _string_items(_module_constant(tree, "ESTIMATORS"))]
    normalizer = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "verl_normalizer")
    modes = [c.comparators[0].value for c in ast.walk(normalizer)
             if isinstance(c, ast.Compare) and isinstance(c.left, ast.Name) and c.left.id == "loss_agg_mode"
             and isinstance(c.comparators[0], ast.Constant)]
    keywords += [Keyword("verl loss_agg_mode", m, VALUE, None, "ppo_loss") for m in modes]
    return keywords


TRL_ALIASES = {"epsilon_low": "epsilon", "current_gradient_accumulation_steps": "gradient_accumulation_steps"}
"""Attributes of TRL's trainer that hold a ``GRPOConfig`` field under another name."""


def trl_keywords(grpo_config: type | None = None) -> list[Keyword]:
    """The TRL trainer's own keywords and the ``loss_type`` values it runs, from its source; with
    ``grpo_config`` (``trl.GRPOConfig``) also every field of it that ``rlloss.integrations.trl`` reads
    (an attribute of that name, on the config or on TRL's trainer, which copies the fields)."""
    tree = _tree(ROOT / "rlloss" / "integrations" / "trl.py")
    trainer = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "GRPOTrainer")
    init = next(f for f in trainer.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    out = [Keyword("rlloss.integrations.trl.GRPOTrainer", k, d, None, "GRPOTrainer")
           for k, d in _function_defaults(init).items()]
    out += [Keyword("trl loss_type", v, VALUE, None, "GRPOConfig")
            for v in _string_items(_module_constant(tree, "LOSS_TYPES"))]
    if grpo_config is not None:
        fields = {f.name: f.default for f in dataclasses.fields(grpo_config)}
        read = {TRL_ALIASES.get(n.attr, n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        out += [Keyword("trl.GRPOConfig", name, fields[name], None, "GRPOConfig")
                for name in sorted(read & set(fields))]
    return out


# ----------------------------------------------------------------------------------------------
# What a test sets
# ----------------------------------------------------------------------------------------------


class Ref(NamedTuple):
    file: str
    name: str

    @classmethod
    def parse(cls, ref: str) -> Ref:
        file, _, name = ref.partition("::")
        return cls(file, name)


def _definitions(tree: ast.Module) -> dict[str, list[ast.AST]]:
    """Module-level names -> the statements that define them (functions, classes, assignments)."""
    defs: dict[str, list[ast.AST]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.setdefault(node.name, []).append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defs.setdefault(name.id, []).append(node)
    return defs


def find_test(ref: Ref) -> ast.FunctionDef | None:
    path = TESTS / ref.file
    if not path.is_file():
        return None
    scope: list[ast.stmt] = _tree(path).body
    *classes, name = ref.name.split("::")
    for cls in classes:
        found = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return None
        scope = found[0].body
    for node in scope:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name \
                and name.startswith("test"):
            return node
    return None


@functools.cache
def _imports(file: str) -> dict[str, tuple[str, str | None]]:
    """A test module's imports of its sibling modules: local name -> (file, the name imported or None for the
    module itself), for ``import test_x as base`` and ``from helpers import spawn_ranks``."""
    out: dict[str, tuple[str, str | None]] = {}
    for node in _tree(TESTS / file).body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (TESTS / f"{alias.name}.py").is_file():
                    out[alias.asname or alias.name] = (f"{alias.name}.py", None)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level \
                and (TESTS / f"{node.module}.py").is_file():
            for alias in node.names:
                out[alias.asname or alias.name] = (f"{node.module}.py", alias.name)
    return out


@functools.cache
def reach(ref: Ref) -> tuple[tuple[str, ast.AST], ...]:
    """The test's own code and the module-level code it names, transitively, in its module and in the sibling
    modules it imports (helpers, tables, fixtures by parameter name): ``(file, node)`` pairs."""
    test = find_test(ref)
    if test is None:
        return ()
    seen: list[tuple[str, ast.AST]] = []
    todo: list[tuple[str, ast.AST]] = [(ref.file, test)]
    done: set[tuple[str, str]] = set()

    def follow(file: str, name: str) -> None:
        if (file, name) in done:
            return
        done.add((file, name))
        defs = _definitions(_tree(TESTS / file))
        if name in defs:
            todo.extend((file, d) for d in defs[name])
        elif name in _imports(file):
            target, imported = _imports(file)[name]
            if imported is not None:
                follow(target, imported)

    while todo:
        file, node = todo.pop()
        if any(node is n for _, n in seen):
            continue
        seen.append((file, node))
        imports = _imports(file)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                follow(file, sub.id)
            elif isinstance(sub, ast.arg):
                follow(file, sub.arg)  # a fixture, by parameter name
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) \
                    and imports.get(sub.value.id, ("", ""))[1] is None and sub.value.id in imports:
                follow(imports[sub.value.id][0], sub.attr)  # base.compare, with ``import test_x as base``
    return tuple(seen)


def _non_default(value: ast.AST | None, default: Any) -> bool:
    if default is inspect.Parameter.empty or value is None:
        return True
    literal = _constant(value)
    return literal is inspect.Parameter.empty or not (type(literal) is type(default) and literal == default)


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


FORWARDERS = {"dict", "replace", "partial", "given", "example", "ActorConfig", "AlgoConfig", "PolicyLossConfig",
              "GRPOConfig"}
"""Calls whose keywords reach the function under test indirectly: a dict of options, ``dataclasses.replace``,
hypothesis's ``@given``/``@example`` (the test's parameters, then passed on by name), the trainers' config
classes (verl's and TRL's code under test reads its options from them)."""


@functools.cache
def _names(ref: Ref) -> frozenset[str]:
    """Every name and attribute the code of ``reach(ref)`` mentions."""
    return frozenset(n.id if isinstance(n, ast.Name) else n.attr for _, node in reach(ref) for n in ast.walk(node)
                     if isinstance(n, (ast.Name, ast.Attribute)))


@functools.cache
def _helpers(ref: Ref) -> frozenset[str]:
    """The module-level functions of the test modules ``reach(ref)`` goes through: calls of them forward."""
    files = {file for file, _ in reach(ref)}
    return frozenset(name for file in files for name, nodes in _definitions(_tree(TESTS / file)).items()
                     if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in nodes))


@functools.cache
def _bound_functions(file: str) -> frozenset[str]:
    """Names a test module binds to a known callable: every import (module level or local, of any package:
    ``assume``, ``st``), every ``def`` at any depth and every ``name = lambda ...``. A call of one of them is
    not a call of a function taken from a table."""
    out = set()
    for node in ast.walk(_tree(TESTS / file)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return frozenset(out)


@functools.cache
def _table_bound(file: str) -> frozenset[str]:
    """Names a test module binds from a table: ``fn, kwargs = TABLE[name]`` (any subscript) or ``for fn in ...``."""
    out = set()
    for node in ast.walk(_tree(TESTS / file)):
        targets = (node.targets if isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript) else
                   [node.target] if isinstance(node, (ast.For, ast.comprehension)) else [])
        for target in targets:
            out.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return frozenset(out)


def _indirect(call: ast.Call, file: str) -> bool:
    """A call of a function taken from a table (``fn(...)`` after ``fn, kwargs = TABLE[name]`` or in a loop over
    one): the function is not named at the call, so any keyword there may be the function's. A name bound to a
    known callable (an import, a ``def``, a lambda) or a parameter (``binds(...)``) is not one."""
    return isinstance(call.func, ast.Name) and call.func.id in _table_bound(file) \
        and call.func.id not in _definitions(_tree(TESTS / file)) and call.func.id not in _imports(file) \
        and call.func.id not in _bound_functions(file) and not hasattr(builtins, call.func.id)


def sets_keyword(ref: Ref, kw: Keyword) -> bool:
    """Whether the code ``reach(ref)`` sets ``kw`` to a value that is not its default literal.

    The test must name the keyword's function (``kw.call``) somewhere. A keyword argument counts in a
    call of that function or class, of a forwarder (``FORWARDERS``), of a helper of the test modules or of a
    callable the test picked from a table; a positional argument at the keyword's position in a call of the
    function (or of such a callable); a ``"name": value`` entry, a parametrised argument, or an assignment
    ``x.name = value`` / ``x["name"] = value`` anywhere. For an option's value, the value itself (a string
    constant, without the ``rlloss_`` prefix too).
    """
    if kw.call is not None and kw.call not in _names(ref):
        return False
    if kw.default is VALUE:
        bare = kw.name.removeprefix("rlloss_")
        return any(isinstance(sub, ast.Constant) and sub.value in (kw.name, bare)
                   for _, node in reach(ref) for sub in ast.walk(node))
    helpers = _helpers(ref)
    for file, node in reach(ref):
        for sub in ast.walk(node):
            if isinstance(sub, ast.Call):
                callee = _callee(sub)
                if callee == "parametrize" and sub.args:
                    names = _constant(sub.args[0])
                    if isinstance(names, str) and kw.name in [n.strip() for n in names.split(",")]:
                        return True
                indirect = _indirect(sub, file)
                relevant = kw.call is None or indirect or callee in (kw.call, *FORWARDERS) or callee in helpers
                if relevant and any(k.arg == kw.name and _non_default(k.value, kw.default) for k in sub.keywords):
                    return True
                if kw.position is not None and (callee == kw.call or indirect) and len(sub.args) > kw.position \
                        and not any(isinstance(a, ast.Starred) for a in sub.args[:kw.position + 1]) \
                        and _non_default(sub.args[kw.position], kw.default):
                    return True
            elif isinstance(sub, ast.Dict):
                if any(isinstance(k, ast.Constant) and k.value == kw.name and _non_default(v, kw.default)
                       for k, v in zip(sub.keys, sub.values)):
                    return True
            elif isinstance(sub, ast.Assign):
                for target in sub.targets:
                    named = (target.attr if isinstance(target, ast.Attribute) else
                             _constant(target.slice) if isinstance(target, ast.Subscript) else None)
                    if named == kw.name and _non_default(sub.value, kw.default):
                        return True
    return False


def all_tests() -> list[Ref]:
    """Every test function of the suite (module level and in classes), for the registry's upkeep."""
    out = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in _tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                out.append(Ref(path.name, node.name))
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                out += [Ref(path.name, f"{node.name}::{f.name}") for f in node.body
                        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name.startswith("test")]
    return out


# ----------------------------------------------------------------------------------------------
# The registry: each keyword -> the tests that set it away from its default, each against an oracle
# ----------------------------------------------------------------------------------------------

ORACLE = "test_oracles.py::test_policy_loss_matches_the_oracle"
SURROGATES = "test_coverage_surrogates.py::test_surrogate_keywords_match_the_oracle"
OBJECTIVE_FIELDS = "test_coverage_surrogates.py::test_objective_fields_match_the_oracle"
CLIP_KEYWORDS = "test_coverage_surrogates.py::test_policy_loss_clip_keywords_match_the_oracle"
CLIP_COV = "test_coverage_surrogates.py::test_clip_cov_keywords_by_hand"
GMPO_SURROGATE = "test_coverage_surrogates.py::test_gmpo_surrogate_keywords_match_the_oracle"
RECIPE_ADVANTAGES = "test_coverage_recipes.py::test_custom_recipe_advantages_by_hand"
RECIPE_LOSS = "test_coverage_recipes.py::test_custom_recipe_loss_matches_the_oracle"
GROUP_ORACLE = "test_oracles.py::test_group_advantages_match_the_oracle"
HIDDEN = "test_hidden.py::test_matches_token_logprobs_on_materialised_logits"
HIDDEN_LOSS = "test_hidden.py::test_policy_loss_from_hidden_matches_the_loss_on_materialised_logits"
VOCAB_PARALLEL = "test_hidden.py::test_vocabulary_parallel_equals_the_unsharded_call"
SUB_GROUP = "test_coverage_distributed.py::test_a_sub_group_reduces_over_its_members_only"
HELPERS = "test_coverage_helpers.py::test_helpers_on_every_backend_by_hand"
TRL = "test_integrations_trl.py::test_compute_loss_matches_trl"
TRL_MORE = "test_coverage_trl.py::test_compute_loss_matches_trl"
VERL = "test_integrations_verl.py::test_policy_loss_matches_verl"
VERL_MORE = "test_coverage_verl.py::test_policy_loss_matches_verl"
VERL_ESTIMATORS = "test_integrations_verl.py::test_estimators_match_verl"


def _each(owner: str, names: str, *tests: str) -> dict[str, tuple[str, ...]]:
    return {f"{owner}:{name}": tests for name in names.split()}


COVERED: dict[str, tuple[str, ...]] = {
    # --- the objectives' fields
    **_each("rlloss.CISPO", "low high", ORACLE),
    **_each("rlloss.ClipCov", "ratio cov_low cov_high eps_low eps_high seed", CLIP_COV),
    **_each("rlloss.DPPO", "divergence low high weight_cap", ORACLE),
    **_each("rlloss.DRO", "beta", ORACLE),
    **_each("rlloss.GMPO", "log_clip_low log_clip_high", OBJECTIVE_FIELDS),
    **_each("rlloss.KLCov", "ratio coef", ORACLE),
    **_each("rlloss.PPO", "eps_low eps_high dual_clip delta level", ORACLE),
    **_each("rlloss.SAPO", "tau_pos tau_neg", OBJECTIVE_FIELDS),
    **_each("rlloss.VESPO", "k_pos lam_pos k_neg lam_neg", OBJECTIVE_FIELDS),
    # --- the presets: Recipe's fields and methods
    **_each("rlloss.Recipe", "baseline scale", RECIPE_ADVANTAGES),
    **_each("rlloss.Recipe", "eps_low eps_high aggregation beta level objective", RECIPE_LOSS),
    **_each("rlloss.Recipe", "overlong_max_len overlong_cache_len",
            "test_coverage_recipes.py::test_custom_recipe_overlong_penalty_by_hand"),
    **_each("rlloss.Recipe", "dynamic_sampling overlong_filter",
            "test_coverage_recipes.py::test_the_batch_filter_flags_change_no_number"),
    **_each("rlloss.Recipe.advantages", "groups group_size", RECIPE_ADVANTAGES),
    # --- the loss
    **_each("rlloss.policy_loss", "objective ref_logp beta kl kl_bias_correction token_weights aggregation max_tokens "
                                  "num_tokens num_seqs dp_size backend", ORACLE),
    **_each("rlloss.policy_loss", "eps_low eps_high dual_clip delta level max_log_ratio", CLIP_KEYWORDS),
    **_each("rlloss.policy_loss_from_logits", "temperature entropy_coef backend",
            "test_coverage_helpers.py::test_policy_loss_from_logits_matches_float64_log_softmax"),
    **_each("rlloss.policy_loss_from_logits", "inplace_backward",
            "test_logits.py::test_inplace_backward_gives_the_same_gradient"),
    **_each("rlloss.policy_loss_from_hidden", "bias temperature entropy_coef max_tile_bytes backend", HIDDEN_LOSS),
    **_each("rlloss.policy_loss_from_hidden", "group", VOCAB_PARALLEL),
    **_each("rlloss.token_logprobs", "temperature return_entropy backend",
            "test_logits.py::test_agrees_with_float64_log_softmax"),
    **_each("rlloss.token_logprobs", "mask",
            "test_pitfalls.py::test_masked_ids_are_never_read_and_give_zero_with_zero_gradient"),
    **_each("rlloss.linear_token_logprobs", "bias temperature mask return_entropy entropy_grad max_tile_bytes backend",
            HIDDEN),
    **_each("rlloss.linear_token_logprobs", "group", VOCAB_PARALLEL),
    # --- the per-token surrogates
    **_each("rlloss.clipped_surrogate", "mask eps_low eps_high dual_clip level max_log_ratio delta backend",
            SURROGATES),
    **_each("rlloss.cispo_surrogate", "mask low high max_log_ratio backend", SURROGATES),
    **_each("rlloss.sapo_surrogate", "mask tau_pos tau_neg max_log_ratio backend", SURROGATES),
    **_each("rlloss.reinforce_surrogate", "mask max_log_ratio backend", SURROGATES),
    **_each("rlloss.dppo_surrogate", "mask divergence low high weight_cap max_log_ratio backend", SURROGATES),
    **_each("rlloss.dro_surrogate", "mask max_log_ratio backend", SURROGATES),
    **_each("rlloss.vespo_surrogate", "mask k_pos lam_pos k_neg lam_neg max_log_ratio backend", SURROGATES),
    **_each("rlloss.kl_cov_surrogate", "mask ratio coef max_log_ratio backend", SURROGATES),
    **_each("rlloss.gmpo_surrogate", "mask log_clip_low log_clip_high max_log_ratio backend", GMPO_SURROGATE),
    **_each("rlloss.clip_cov_surrogate", "mask ratio cov_low cov_high eps_low eps_high seed max_log_ratio backend",
            CLIP_COV),
    # --- KL, aggregation, shaping
    **_each("rlloss.k3_kl", "backend", HELPERS),
    **_each("rlloss.kl_estimate", "kind", "test_known_values.py::test_k1_k2"),
    **_each("rlloss.kl_estimate", "backend", HELPERS),
    **_each("rlloss.masked_mean", "dim normalizer",
            "test_known_values.py::test_masked_mean_with_constant_normalizer_and_empty"),
    **_each("rlloss.masked_mean", "backend", HELPERS),
    **_each("rlloss.soft_overlong_penalty", "factor",
            "test_known_values.py::test_soft_overlong_penalty_factor_scales_every_piece"),
    **_each("rlloss.soft_overlong_penalty", "backend", HELPERS),
    **_each("rlloss.dynamic_sampling_mask", "groups backend", HELPERS),
    **_each("rlloss.dynamic_sampling_mask", "group_size",
            "test_known_values.py::test_dynamic_sampling_keeps_groups_with_mixed_rewards"),
    # --- advantages and returns
    **_each("rlloss.group_advantages", "groups baseline scale eps singleton backend", GROUP_ORACLE),
    **_each("rlloss.group_advantages", "group_size",
            "test_known_values.py::test_grpo_and_dr_grpo_advantages_on_one_group"),
    **_each("rlloss.gdpo_advantages", "groups singleton", "test_estimators.py::test_gdpo_singletons"),
    **_each("rlloss.gdpo_advantages", "mask group_size weights", "test_estimators.py::test_gdpo_by_hand"),
    **_each("rlloss.gdpo_advantages", "eps", "test_coverage_helpers.py::test_gdpo_eps_by_hand"),
    **_each("rlloss.gpg_advantages", "groups mask group_size singleton", "test_estimators.py::test_gpg_by_hand"),
    **_each("rlloss.opo_advantages", "groups singleton", "test_estimators.py::test_opo_singletons"),
    **_each("rlloss.opo_advantages", "mask group_size", "test_estimators.py::test_opo_by_hand"),
    **_each("rlloss.reinforce_pp_baseline_advantages", "groups singleton",
            "test_estimators.py::test_reinforce_pp_baseline_singletons"),
    **_each("rlloss.reinforce_pp_baseline_advantages", "mask group_size",
            "test_estimators.py::test_reinforce_pp_baseline_by_hand"),
    **_each("rlloss.optimal_token_baseline_advantages", "groups singleton",
            "test_estimators.py::test_optimal_token_baseline_ties_and_singletons"),
    **_each("rlloss.optimal_token_baseline_advantages", "old_logp sum_pi_squared group_size is_weights "
                                                         "handle_zero_tail",
            "test_estimators.py::test_optimal_token_baseline_by_hand"),
    **_each("rlloss.passk_advantages", "groups mask scale", "test_oracles.py::test_passk_advantages_match_the_oracle"),
    **_each("rlloss.passk_advantages", "group_size eps", "test_estimators.py::test_passk_by_hand"),
    **_each("rlloss.discounted_returns", "gamma", "test_estimators.py::test_discounted_returns_by_hand"),
    **_each("rlloss.reinforce_pp_advantages", "gamma",
            "test_estimators.py::test_discounted_returns_match_the_sequential_scan"),
    # --- corrections
    **_each("rlloss.importance_weights", "mode low high", "test_corrections.py::test_importance_weights_token_level"),
    **_each("rlloss.importance_weights", "level", "test_corrections.py::test_importance_weights_sequence_level"),
    **_each("rlloss.importance_weights", "normalize",
            "test_corrections.py::test_importance_weights_normalize_token_and_sequence"),
    **_each("rlloss.rejection_mask", "kind", "test_corrections.py::test_rejection_k2_and_k3_token"),
    **_each("rlloss.rejection_mask", "level low", "test_corrections.py::test_rejection_sequence_levels"),
    # --- rlloss.distributed
    **_each("rlloss.distributed.step_counts", "group count_empty_rows", SUB_GROUP),
    **_each("rlloss.distributed.top_entropy_mask", "group", SUB_GROUP),
    # --- rlloss.audit
    **_each("rlloss.audit.Audit", "label", "test_coverage_audit.py::test_an_audits_label_heads_its_report"),
    **_each("rlloss.audit.audit_loss", "micro_batches dp_size seed equal_rows",
            "test_coverage_audit.py::test_audit_loss_seed_and_equal_rows"),
    **_each("rlloss.audit.audit_loss", "max_tokens", "test_audit.py::test_every_rlloss_loss_is_recovered"),
    **_each("rlloss.audit.audit_trl", "num_processes seed",
            "test_coverage_audit.py::test_audit_trl_processes_and_seed"),
    **_each("rlloss.audit.audit_trl", "trainer_cls", "test_audit_trainers.py::test_rlloss_trl_trainer_audits_as_trl"),
    **_each("rlloss.audit.audit_verl", "micro_batches dp_size response_length seed",
            "test_coverage_audit.py::test_audit_verl_shape_and_seed"),
    # --- the TRL integration
    **_each("rlloss.integrations.trl.GRPOTrainer", "objective",
            "test_coverage_trl.py::test_an_objective_equal_to_the_loss_type_is_trls_loss"),
    **_each("rlloss.integrations.trl.GRPOTrainer", "backend",
            "test_integrations_trl.py::test_compute_loss_matches_trl_with_triton"),
    **_each("trl loss_type", "grpo bnpo dr_grpo dapo cispo sapo luspo vespo", TRL),
    **_each("trl.GRPOConfig", "beta delta entropy_coef epsilon epsilon_high gradient_accumulation_steps "
                              "importance_sampling_level loss_type max_completion_length num_generations "
                              "off_policy_mask_threshold sapo_temperature_neg sapo_temperature_pos "
                              "steps_per_generation top_entropy_quantile use_bias_correction_kl use_vllm", TRL),
    **_each("trl.GRPOConfig", "cast_lm_head_to_fp32 temperature use_liger_kernel",
            "test_integrations_trl.py::test_loss_from_hidden_matches_trl"),
    **_each("trl.GRPOConfig", "scale_rewards", "test_integrations_trl.py::test_advantages_match_trl"),
    **_each("trl.GRPOConfig", "num_generations_eval reward_weights", "test_coverage_trl.py::test_advantages_match_trl"),
    **_each("trl.GRPOConfig", "router_aux_loss_coef",
            "test_coverage_trl.py::test_router_aux_loss_coef_of_the_config_matches_trl"),
    **_each("trl.GRPOConfig", "vespo_k_pos vespo_lambda_pos vespo_k_neg vespo_lambda_neg "
                              "vllm_importance_sampling_correction", TRL_MORE),
    **_each("trl.GRPOConfig", "multi_objective_aggregation use_adaptive_entropy",
            "test_integrations_trl.py::test_unsupported_options_are_named"),
    # --- the verl integration
    **_each("verl config", "clip_ratio_low clip_ratio_high clip_ratio_c tau_pos tau_neg kl_cov_ratio ppo_kl_coef "
                           "clip_cov_ratio clip_cov_lb dro_beta global_batch_size batch_num_tokens dp_size", VERL),
    **_each("verl config", "clip_ratio clip_cov_ub", VERL_MORE),
    **_each("verl config", "gamma norm_adv_by_std_in_grpo", VERL_ESTIMATORS),
    **_each("verl config", "loss_scale_factor", "test_integrations_verl.py::test_loss_scale_factor_matches_verl"),
    **_each("verl policy loss", "loss_agg_mode rollout_is_weights", VERL),
    **_each("verl estimator", "index config reward_baselines", VERL_ESTIMATORS),
    **_each("verl loss_mode", "rlloss_ppo rlloss_gspo rlloss_cispo rlloss_sapo rlloss_reinforce rlloss_dppo_tv "
                              "rlloss_dppo_kl rlloss_kl_cov rlloss_clip_cov rlloss_dro", VERL),
    **_each("verl loss_mode", "rlloss_gmpo", "test_integrations_verl.py::test_gmpo_matches_verl_geo_mean"),
    **_each("verl loss_mode", "rlloss_vespo", "test_integrations_verl.py::test_vespo_loss_is_rlloss_vespo"),
    **_each("verl adv_estimator", "rlloss_grpo rlloss_dr_grpo rlloss_rloo rlloss_opo rlloss_gpg "
                                  "rlloss_reinforce_plus_plus rlloss_reinforce_plus_plus_baseline rlloss_remax",
            VERL_ESTIMATORS),
    **_each("verl loss_agg_mode", "token-mean token-sum seq-mean-token-mean seq-mean-token-sum "
                                  "seq-mean-token-sum-norm", VERL),
}
"""keyword (``owner:name``) -> the tests that set it away from its default and compare with an oracle."""

NOT_OPTIONS = {
    "verl config:global_batch_info": "verl's own channel: ppo_loss writes the step's counts there; each count it "
                                     "carries (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) "
                                     "is an entry of its own",
    "verl config:policy_loss": "the actor config's PolicyLossConfig: its fields (kl_cov_ratio, dro_beta, ...) are "
                               "entries of their own",
    "verl policy loss:config": "verl's ppo_loss always passes the actor config; its fields are the entries of "
                               "'verl config'",
}
"""What the source reads that is not an option of its own: the containers of options."""

PENDING: dict[str, str] = {}
"""Keywords whose test is known to be missing, with the reason: their check fails, as expected (strict)."""

ORACLES = {
    "test_oracles.py": "SPEC written again: float64 Python loops, one autograd scalar per token",
    "test_known_values.py": "values worked out by hand from the papers' formulas",
    "test_coverage_surrogates.py": "test_oracles.py's float64 loops (the clamp at max_log_ratio), or SPEC by hand",
    "test_coverage_recipes.py": "advantages written out per group from SPEC; test_oracles.py's loss; DAPO's "
                                "penalty at hand-picked lengths",
    "test_coverage_helpers.py": "values worked out by hand, or float64 log_softmax",
    "test_coverage_distributed.py": "counts summed by hand and torch.quantile over the group's batches",
    "test_coverage_audit.py": "the formula's scale, or the model of the trainer's code test_audit_trainers.py "
                              "writes from its source",
    "test_coverage_trl.py": "TRL 1.16's own GRPOTrainer on the same model and batch",
    "test_coverage_verl.py": "verl 0.9.1's own loss through ppo_loss on the same micro-batch",
    "test_integrations_trl.py": "TRL 1.16's own GRPOTrainer on the same model and batch",
    "test_integrations_trl.py::test_unsupported_options_are_named": "the documented refusal: NotImplementedError "
                                                                     "naming the option",
    "test_integrations_verl.py": "verl 0.9.1's own losses and estimators through its entry points",
    "test_integrations_verl.py::test_vespo_loss_is_rlloss_vespo": "no verl counterpart: rlloss.policy_loss with "
                                                                   "VESPO, itself checked against test_oracles.py",
    "test_audit.py": "the gradient weights of each hand-written loss, worked out from its formula",
    "test_audit_trainers.py": "TRL's own audit of the same configuration (rlloss's trainer reproduces it)",
    "test_estimators.py": "values worked out by hand (the by-hand and singleton cases), or a sequential loop",
    "test_corrections.py": "values worked out by hand from the formulas",
    "test_hidden.py": "token_logprobs' reference on logits materialised here in fp32, and autograd through it",
    "test_logits.py::test_agrees_with_float64_log_softmax": "float64 torch.log_softmax",
    "test_logits.py::test_inplace_backward_gives_the_same_gradient": "the gradient without inplace_backward",
    "test_pitfalls.py::test_masked_ids_are_never_read_and_give_zero_with_zero_gradient": "plain torch log_softmax "
                                                                                           "on the valid tokens",
}
"""Each registered test's oracle: per file where the whole file compares with one kind, else per test."""


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------


def _keywords(grpo_config: type | None = None) -> dict[str, Keyword]:
    return {kw.key: kw for kw in library_keywords() + verl_keywords() + trl_keywords(grpo_config)}


def _trl_config() -> type | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.GRPOConfig


def oracle_of(ref: Ref) -> str | None:
    return ORACLES.get(f"{ref.file}::{ref.name}") or ORACLES.get(ref.file)


def test_the_registry_lists_every_keyword_of_the_api():
    """Both ways: every keyword has an entry (covered, pending or not an option), and every entry a keyword.
    The ``GRPOConfig`` fields are enumerated where TRL is installed (the trainers' run checks them)."""
    keywords = _keywords(_trl_config())
    entries = [*COVERED, *PENDING, *NOT_OPTIONS]
    assert len(entries) == len(set(entries)), "a keyword is in two of COVERED, PENDING, NOT_OPTIONS"
    unlisted = sorted(set(keywords) - set(entries))
    assert not unlisted, f"keywords without a test: {unlisted}; name the test(s) that set each one in COVERED"
    known_without_trl = {k for k in entries if k.startswith("trl.GRPOConfig:")} if _trl_config() is None else set()
    stale = sorted(set(entries) - set(keywords) - known_without_trl)
    assert not stale, f"entries for keywords the API no longer has: {stale}"


@pytest.mark.trainers
def test_the_registry_lists_every_grpo_config_field_the_integration_reads():
    """In the trainers' environment: the ``GRPOConfig`` fields ``rlloss.integrations.trl`` reads, both ways, and
    each one's tests set it away from TRL's own default."""
    from helpers import require_trainer

    grpo_config = _trl_config()
    require_trainer(None if grpo_config is not None else ImportError("trl is not installed"))
    fields = {key: kw for key, kw in _keywords(grpo_config).items() if kw.owner == "trl.GRPOConfig"}
    listed = {k for k in [*COVERED, *PENDING, *NOT_OPTIONS] if k.startswith("trl.GRPOConfig:")}
    assert sorted(fields) == sorted(listed)
    unset = [f"{key}: {ref}" for key, kw in fields.items() for ref in COVERED.get(key, ())
             if not sets_keyword(Ref.parse(ref), kw)]
    assert not unset, f"tests that do not set the field away from TRL's default: {unset}"


def test_each_registered_test_exists_names_its_oracle_and_sets_its_keyword():
    keywords = _keywords(_trl_config())
    problems = []
    for key, refs in COVERED.items():
        kw = keywords.get(key) or Keyword(*key.split(":", 1), inspect.Parameter.empty, None, "GRPOConfig")
        if not refs:
            problems.append(f"{key}: no test named")
        for ref in map(Ref.parse, refs):
            where = f"{key} -> {ref.file}::{ref.name}"
            if find_test(ref) is None:
                problems.append(f"{where}: no such test")
            elif oracle_of(ref) is None:
                problems.append(f"{where}: the test's oracle is not named in ORACLES")
            elif not sets_keyword(ref, kw):
                problems.append(f"{where}: the test does not set {kw.name} away from its default {kw.default!r}")
    assert not problems, "\n".join(problems)


def test_every_oracle_entry_is_used():
    """An entry of ORACLES that no registered test uses is a stale claim."""
    used = {Ref.parse(ref) for refs in COVERED.values() for ref in refs}
    stale = [key for key in ORACLES if not any(key in (r.file, f"{r.file}::{r.name}") for r in used)]
    assert not stale, f"ORACLES entries no registered test uses: {stale}"


def test_the_check_tells_a_set_keyword_from_an_unset_one():
    """The static check itself, on this suite's own tests: it sees a keyword set in the test, in a helper or a
    table it names, by position; it refuses a default literal, another function's keyword and an absent one."""
    ppo_eps = Keyword("rlloss.PPO", "eps_high", None, 1, "PPO")
    assert sets_keyword(Ref.parse(ORACLE), ppo_eps)  # in CASES, a table the test names
    assert sets_keyword(Ref.parse(TRL), Keyword("trl.GRPOConfig", "delta", None, None, "GRPOConfig"))
    mask = Keyword("rlloss.cispo_surrogate", "mask", None, 3, "cispo_surrogate")
    assert sets_keyword(Ref.parse(SURROGATES), mask)  # by position, through a callable from a table
    # the default literal does not count: test_oracles' PPO case sets eps_low=0.2, its default
    ref = Ref("test_recipes.py", "test_preset_values")
    assert not sets_keyword(ref, Keyword("rlloss.PPO", "eps_low", 0.2, 0, "PPO"))
    # another function's keyword: importance_weights(low=...) does not set CISPO's low
    ref = Ref("test_corrections.py", "test_importance_weights_token_level")
    assert not sets_keyword(ref, Keyword("rlloss.CISPO", "low", None, 0, "CISPO"))
    assert not sets_keyword(ref, Keyword("rlloss.importance_weights", "normalize", False, None, "importance_weights"))
    assert find_test(Ref("test_oracles.py", "no_such_test")) is None


def test_no_keyword_is_pending():
    """Reported as an expected failure while PENDING holds entries, with their reasons (``-ra`` lists them)."""
    if PENDING:
        pytest.xfail("; ".join(f"{key}: {reason}" for key, reason in PENDING.items()))
