"""Every TensorRT and pycuda name our engine code uses exists in TensorRT 10.3, 10.13, 11.4 and pycuda.

TensorRT cannot be installed here, so the code is checked against the vocabularies of the real
bindings in tests/data/tensorrt-api (a copy of the workplace's shared vocabularies, with their
README saying how they were made; a name is present when some listed string ends with it:
the linker stores a string that is the tail of another only once). Names are collected from the
AST by following values: whatever comes from `import_trt(...)` / `import_pycuda()` / `require(...)`
is tracked through assignments, tuple unpacking, `self.<attr>`, calls to functions of the same
file (arguments -> parameters, return values -> results), and every attribute read on it is a
name the bindings must have. Code in functions named `_rtx_*` runs only on TensorRT-RTX and is
checked against the installed tensorrt_rtx_bindings instead; shared code is checked against both.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VOCAB = Path(__file__).resolve().parents[1] / "data" / "tensorrt-api"
SOURCES = [REPO / "sdk" / "backends" / "engine_build.py", REPO / "sdk" / "backends" / "tensorrt_backend.py"]
TRT_VERSIONS = ("10.3", "10.13", "11.4")
PYCUDA_VOCAB = "names-pycuda-2026.1.txt"
# calls whose result is the module itself
SEEDS = {"import_trt": "trt", "import_pycuda": "cuda"}
REQUIRE_SEEDS = {"tensorrt": "trt", "tensorrt_rtx_bindings": "trt", "pycuda.driver": "cuda"}
# removed in TensorRT 10.0 (or 11) and the pre-strongly-typed precision machinery
DEPRECATED = {"build_engine", "execute_async_v2", "execute_v2", "num_bindings", "get_binding_shape",
              "max_workspace_size", "EXPLICIT_BATCH", "FP16", "INT8", "int8_calibrator", "IInt8EntropyCalibrator2",
              "OBEY_PRECISION_CONSTRAINTS", "BuilderFlag"}
PYTHON_PROTOCOL = set(dir(object))  # __init__, __class__...: Python's, not the bindings'


# ---------------------------------------------------------------------------- the collector

class TaintCollector:
    """Collects (kind, name, function) for attribute reads on values that come from trt / pycuda."""

    def __init__(self, source: str):
        self.tree = ast.parse(source)
        self.functions: dict[str, ast.FunctionDef] = {}
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
            if isinstance(node, ast.FunctionDef):
                self.functions.setdefault(node.name, node)
        self.taint: dict[tuple[int, str], str] = {}   # (scope id, name or 'self.attr') -> kind
        self.returns: dict[str, object] = {}           # function name -> kind or tuple of kinds
        self.uses: set[tuple[str, str, str]] = set()

    # scopes: a name is looked up in its function, then in enclosing functions (closures)
    def _scopes(self, node):
        scopes = []
        while node is not None:
            if isinstance(node, ast.FunctionDef):
                scopes.append(node)
            node = self.parents.get(node)
        return scopes or [self.tree]

    def _class_of(self, node):
        while node is not None and not isinstance(node, ast.ClassDef):
            node = self.parents.get(node)
        return node

    def _key(self, expr):
        """'name' for a Name, 'self.attr' for self.attr, else None."""
        if isinstance(expr, ast.Name):
            return expr.id
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return f"self.{expr.attr}"
        return None

    def _lookup(self, key, at):
        if key.startswith("self."):
            cls = self._class_of(at)
            return self.taint.get((id(cls), key))
        for scope in self._scopes(at):
            if (id(scope), key) in self.taint:
                return self.taint[(id(scope), key)]
        return None

    def _set(self, target, kind, at) -> bool:
        key = self._key(target)
        if key is None or kind is None:
            return False
        scope = self._class_of(at) if key.startswith("self.") else self._scopes(at)[0]
        if self.taint.get((id(scope), key)) == kind:
            return False
        self.taint[(id(scope), key)] = kind
        return True

    def _root(self, expr):
        """Walk an attribute/call/subscript chain to its root; returns (root expr, attribute names outward)."""
        attrs = []
        while True:
            if isinstance(expr, ast.Attribute):
                if self._key(expr) and self._key(expr).startswith("self."):
                    return expr, attrs[::-1]
                attrs.append(expr.attr)
                expr = expr.value
            elif isinstance(expr, ast.Call):
                expr = expr.func
            elif isinstance(expr, ast.Subscript):
                expr = expr.value
            else:
                return expr, attrs[::-1]

    def kind_of(self, expr):
        """The kind ('trt'/'cuda') of the value of `expr`, or a tuple of kinds for a tuple, or None."""
        if isinstance(expr, ast.Tuple):
            return tuple(self.kind_of(e) for e in expr.elts)
        if isinstance(expr, ast.Call):
            func = expr.func
            name = func.id if isinstance(func, ast.Name) else None
            if name in SEEDS:
                return SEEDS[name]
            if name == "require" and expr.args and isinstance(expr.args[0], ast.Constant):
                return REQUIRE_SEEDS.get(expr.args[0].value)
            local = name or (func.attr if isinstance(func, ast.Attribute) and self._key(func.value) == "self"
                             else None)
            if local in self.functions and local in self.returns:
                return self.returns[local]
        root, _ = self._root(expr)
        key = self._key(root)
        return self._lookup(key, expr) if key else None

    def _bind(self, target, kind, at) -> bool:
        if isinstance(target, ast.Tuple):  # a, b = (x, y) element-wise; a, b = trt_call() both from trt
            kinds = kind if isinstance(kind, tuple) else (kind,) * len(target.elts)
            return any([self._bind(t, k, at) for t, k in zip(target.elts, kinds)])
        if isinstance(kind, tuple):
            return False
        return self._set(target, kind, at)

    def _propagate_call(self, call) -> bool:
        func = call.func
        name = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) and self._key(func.value) == "self" else None)
        target = self.functions.get(name)
        if target is None:
            return False
        params = [a.arg for a in target.args.args]
        if params and params[0] == "self":
            params = params[1:]
        changed = False
        for param, arg in zip(params, call.args):
            kind = self.kind_of(arg)
            if isinstance(kind, str):
                changed |= self._set(ast.Name(id=param), kind, target.body[0])
        for kw in call.keywords:
            kind = self.kind_of(kw.value)
            if kw.arg in params and isinstance(kind, str):
                changed |= self._set(ast.Name(id=kw.arg), kind, target.body[0])
        return changed

    def run(self):
        changed = True
        while changed:
            changed = False
            for node in ast.walk(self.tree):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    kind = self.kind_of(node.value)
                    for target in targets:
                        changed |= self._bind(target, kind, node)
                elif isinstance(node, ast.For):
                    kind = self.kind_of(node.iter)
                    changed |= self._bind(node.target, kind if isinstance(kind, str) else None, node)
                elif isinstance(node, ast.Call):
                    changed |= self._propagate_call(node)
                elif isinstance(node, ast.Return) and node.value is not None:
                    kind = self.kind_of(node.value)
                    fn = self._scopes(node)[0]
                    # a function with several returns keeps the one that says most (the most module
                    # names in it), so returns of different shapes cannot take turns forever
                    if kind and (isinstance(kind, str) or any(kind)) and \
                            _known(kind) > _known(self.returns.get(fn.name)):
                        self.returns[fn.name] = kind
                        changed = True
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Attribute) and not isinstance(self.parents.get(node), ast.Attribute):
                root, attrs = self._root(node)
                key = self._key(root)
                kind = self._lookup(key, node) if key else None
                if isinstance(kind, str):
                    fn = self._scopes(node)[0]
                    for attr in attrs:
                        self.uses.add((kind, attr, getattr(fn, "name", "<module>")))
            if isinstance(node, ast.ClassDef):  # a subclass of a bindings class: its base names count
                for base in node.bases:
                    root, attrs = self._root(base)
                    kind = self._lookup(self._key(root), node) if self._key(root) else None
                    if isinstance(kind, str):
                        self.uses.update((kind, a, node.name) for a in attrs)
        return self.uses


def _known(kind) -> int:
    """How many module names (str leaves) a kind holds."""
    if isinstance(kind, str):
        return 1
    return sum(_known(k) for k in kind) if isinstance(kind, tuple) else 0


def collect(path: Path) -> set[tuple[str, str, str]]:
    return TaintCollector(path.read_text()).run()


# ---------------------------------------------------------------------------- vocabularies

def _vocab(name: str) -> list[str]:
    path = VOCAB / name
    assert path.is_file(), f"TensorRT API vocabulary {path} is missing: it is part of the repository"
    return path.read_text().split()


def present(name: str, vocab: list[str]) -> bool:
    """The README's rule: a name is present when some listed string ends with it."""
    return any(s.endswith(name) for s in vocab)


@pytest.fixture(scope="module")
def uses():
    found = set()
    for path in SOURCES:
        found |= {(kind, name, f"{path.name}:{fn}") for kind, name, fn in collect(path)}
    return found


# ---------------------------------------------------------------------------- the checks

def test_suffix_rule_on_the_real_lists():
    trt11 = _vocab("names-trt-11.4.txt")
    assert present("Logger", trt11) and "Logger" not in trt11  # only inside "ILogger"
    assert not present("execute_async_v9", trt11)
    assert not present("EXPLICIT_BATCH", trt11) and present("EXPLICIT_BATCH", _vocab("names-trt-10.3.txt"))


def test_collector_follows_values_through_code():
    source = '''
def helper(trt, network):
    return network.num_inputs, trt.DataType.HALF

class Runner:
    def __init__(self):
        trt = import_trt("tensorrt")
        cuda = require("pycuda.driver")
        self._engine = trt.Runtime(None).deserialize_cuda_engine(b"")
        self._start, self._end = cuda.Event(), cuda.Event()
        helper(trt, network=trt.Builder(None).create_network(0))
        name = "x".upper()

    def run(self):
        context = self._engine.create_execution_context()
        context.execute_async_v2(0)
        self._start.time_till(self._end)
'''
    got = {(k, n) for k, n, _ in TaintCollector(source).run()}
    assert got == {("trt", "Runtime"), ("trt", "deserialize_cuda_engine"), ("trt", "create_execution_context"),
                   ("trt", "execute_async_v2"), ("trt", "num_inputs"), ("trt", "DataType"), ("trt", "HALF"),
                   ("trt", "Builder"), ("trt", "create_network"), ("cuda", "Event"), ("cuda", "time_till")}
    assert not present("execute_async_v2", _vocab("names-trt-10.3.txt"))  # what the check below would catch


def test_collector_sees_the_calls_that_matter(uses):
    trt = {n for k, n, _ in uses if k == "trt"}
    cuda = {n for k, n, _ in uses if k == "cuda"}
    assert {"STRONGLY_TYPED", "parse_from_file", "get_error", "node_operator", "set_memory_pool_limit",
            "WORKSPACE", "create_optimization_profile", "set_shape", "add_optimization_profile",
            "create_timing_cache", "set_timing_cache", "build_serialized_network", "deserialize_cuda_engine",
            "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_profile_shape",
            "set_tensor_address", "set_input_shape", "execute_async_v3", "ILogger", "Severity"} <= trt
    assert {"pagelocked_empty", "mem_alloc", "memcpy_htod_async", "memcpy_dtoh_async", "Stream", "Event",
            "record", "time_till", "synchronize", "retain_primary_context", "push", "pop", "detach",
            "compute_capability", "free"} <= cuda


@pytest.mark.parametrize("version", TRT_VERSIONS)
def test_tensorrt_names_exist(uses, version):
    vocab = _vocab(f"names-trt-{version}.txt")
    missing = sorted({f"{name} ({where})" for kind, name, where in uses
                      if kind == "trt" and not where.split(":")[1].startswith("_rtx_")
                      and name not in PYTHON_PROTOCOL and not present(name, vocab)})
    assert not missing, f"not in TensorRT {version}: {missing}"


def test_pycuda_names_exist(uses):
    vocab = _vocab(PYCUDA_VOCAB)
    missing = sorted({f"{name} ({where})" for kind, name, where in uses
                      if kind == "cuda" and name not in PYTHON_PROTOCOL and not present(name, vocab)})
    assert not missing, f"not in pycuda 2026.1: {missing}"


def test_tensorrt_rtx_names_exist(uses):
    """Shared and _rtx_* code against the installed TensorRT-RTX module (its real attributes)."""
    rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="tensorrt_rtx_bindings is not installed")
    names = set(dir(rtx))
    for value in list(vars(rtx).values()):
        if isinstance(value, type):
            names |= set(dir(value))
            names |= {n for attr in dir(value) if isinstance(getattr(value, attr, None), type)
                      for n in dir(getattr(value, attr))}
    missing = sorted({f"{name} ({where})" for kind, name, where in uses if kind == "trt" and name not in names})
    assert not missing, f"not in TensorRT-RTX {rtx.__version__}: {missing}"


def test_rtx_only_code_really_is_rtx_only(uses):
    """What _rtx_* functions use is absent from at least one TensorRT version (else it need not be split off)."""
    rtx_only = {name for kind, name, where in uses if kind == "trt" and where.split(":")[1].startswith("_rtx_")}
    assert rtx_only, "no _rtx_ code found"
    vocabs = [_vocab(f"names-trt-{v}.txt") for v in TRT_VERSIONS]
    assert any(not present(name, vocab) for name in rtx_only for vocab in vocabs)


def test_no_deprecated_or_removed_api(uses):
    used = sorted({f"{name} ({where})" for kind, name, where in uses if kind == "trt" and name in DEPRECATED})
    assert not used, f"TensorRT API removed in 10.0/11 or superseded by strongly typed networks: {used}"
