"""The layout's rules, checked (docs/ARCHITECTURE.md says why each exists).

- what each package may import (webui -> pipelines.core only; core -> no torch/gradio/engine);
- no import cycles; imports inside functions only for heavy or optional dependencies, said so;
- no module reaches for another module's _private names;
- modules stay small enough to hold in one's head, functions take few positional arguments;
- the engine, and everything that stands in for it, speaks EngineAPI.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

from pipelines.core.engine_api import EngineAPI
from pipelines.core.settings import Paths

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "webui", "extensions")
MAX_MODULE_LINES = 450
MAX_POSITIONAL = 8

# Engine layers, lowest first: a module imports from its own layer or lower ones only.
LAYERS = {"pipelines.core": 0, "pipelines.models": 1, "pipelines.generate": 2,
          "pipelines.hosting": 3, "pipelines.engine": 3, "pipelines.training": 3}
# What webui may import of pipelines: core everywhere; the launcher (the composition root,
# which builds the engine) also the engine and the hosting glue.
WEBUI_ALLOWED = ("pipelines.core",)
LAUNCHER = "webui.cli"
LAUNCHER_ALLOWED = ("pipelines.core", "pipelines.engine", "pipelines.hosting")
TORCH_SIDE = ("torch", "diffusers", "transformers", "accelerate", "spandrel", "peft", "safetensors.torch",
              "open_clip", "xformers", "torchsde", "spandrel_extra_arches", "torchvision")
# Imports that may stay inside a function: heavy (seconds to import, or GPU set-up) or optional.
LAZY_OK = (*TORCH_SIDE, "gradio", "uvicorn", "spaces", "huggingface_hub", "safetensors", "webui.space", "cv2",
           "pipelines.engine", "pipelines.hosting", "webui.app", "webui.api", "git",
           # the engine's job side (diffusers, transformers, peft), made on a job's first use: engine_work
           "pipelines.generate.generation", "pipelines.generate.upscaling")


@dataclass
class Module:
    name: str
    path: Path

    @cached_property
    def source(self) -> str:
        return self.path.read_text()

    @cached_property
    def tree(self) -> ast.Module:
        return ast.parse(self.source)

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]

    def imports(self) -> list[tuple[str, ast.stmt, bool]]:
        """(imported module, node, inside a function) for every import; `from x import y`
        counts as importing x.y when x.y is one of ours, else x."""
        found = []
        for node, in_function in _walk(self.tree):
            if isinstance(node, ast.Import):
                found += [(alias.name, node, in_function) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, node, in_function))
        return found


def _walk(tree: ast.AST, in_function: bool = False):
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # annotations only: never executed
        yield child, in_function
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, inner)


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _modules() -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = Module(".".join(parts), path)
    return found


MODULES = _modules()


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer(name: str) -> int | None:
    return next((rank for prefix, rank in LAYERS.items() if _under(name, (prefix,))), None)


def _violations(check) -> list[str]:
    out = []
    for module in MODULES.values():
        for imported, node, in_function in module.imports():
            problem = check(module, imported, in_function)
            if problem:
                out.append(f"{module.path.relative_to(ROOT)}:{node.lineno}: {problem}")
    return out


def test_webui_imports_only_the_torch_free_core():
    def check(module, imported, _):
        if not module.name.startswith("webui") or not imported.startswith("pipelines"):
            return _under(imported, TORCH_SIDE) and module.name.startswith("webui") and f"imports {imported}"
        allowed = LAUNCHER_ALLOWED if module.name == LAUNCHER else WEBUI_ALLOWED
        return not _under(imported, allowed) and f"imports {imported} (webui may use {', '.join(allowed)})"

    problems = _violations(check)
    assert not problems, "\n".join(problems)


def test_core_imports_no_torch_no_gradio_and_nothing_above_it():
    def check(module, imported, _):
        if not module.name.startswith("pipelines.core"):
            return None
        if _under(imported, (*TORCH_SIDE, "gradio", "webui", "extensions")):
            return f"core imports {imported}"
        layer = _layer(imported)
        return layer not in (None, 0) and f"core imports {imported} (a higher layer)"

    problems = _violations(check)
    assert not problems, "\n".join(problems)


def test_engine_layers_import_downwards_only():
    def check(module, imported, _):
        mine, theirs = _layer(module.name), _layer(imported)
        if module.name.startswith("pipelines") and _under(imported, ("webui", "gradio")):
            return f"the engine imports {imported}"
        if mine is None or theirs is None or theirs <= mine:
            return None
        return f"{module.name} (layer {mine}) imports {imported} (layer {theirs})"

    problems = _violations(check)
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {name: set() for name in MODULES}
    for module in MODULES.values():
        for imported, _, _ in module.imports():
            while imported and imported not in MODULES:  # `from pkg.mod import name` -> pkg.mod
                imported = imported.rpartition(".")[0]
            if imported and imported != module.name and not MODULES[imported].path.name == "__init__.py":
                graph[module.name].add(imported)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                              else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_are_only_heavy_or_optional_ones_and_say_so():
    def check(module, imported, in_function):
        if not in_function:
            return None
        if not _under(imported, LAZY_OK):
            return f"imports {imported} inside a function (move it to the top, or fix the cycle it breaks)"
        return None

    problems = _violations(check)
    for module in MODULES.values():  # and each lazy import says why
        lines = module.source.splitlines()
        for node, in_function in _walk(module.tree):
            if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
                above = lines[node.lineno - 2].strip()
                # on the line, on a comment line above, or on the lazy import just above (a block)
                said = "#" in lines[node.lineno - 1] or above.startswith("#") or (
                    above.startswith(("import ", "from ")) and "#" in above)
                if not said:
                    problems.append(f"{module.path.relative_to(ROOT)}:{node.lineno}: a lazy import without "
                                    "a comment saying why")
    assert not problems, "\n".join(problems)


def test_no_module_uses_another_modules_private_names():
    problems = []
    for module in MODULES.values():
        aliases = {}  # local name -> one of our modules
        for node, _ in _walk(module.tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private:
                        problems.append(f"{module.path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}")
                    full = f"{node.module}.{alias.name}"
                    if full in MODULES:
                        aliases[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES:
                        aliases[alias.asname or alias.name] = alias.name
        for node, _ in _walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                problems.append(f"{module.path.relative_to(ROOT)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_modules_are_small_and_functions_take_few_positional_arguments():
    problems = []
    for module in MODULES.values():
        where = module.path.relative_to(ROOT)
        lines = len(module.source.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{where}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node, _ in _walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a.arg for a in (*node.args.posonlyargs, *node.args.args) if a.arg not in ("self", "cls")]
                if len(positional) > MAX_POSITIONAL:
                    problems.append(f"{where}:{node.lineno}: {node.name}() takes {len(positional)} positional "
                                    f"parameters (at most {MAX_POSITIONAL}; pass a dataclass or make them keyword-only)")
    assert not problems, "\n".join(problems)


def test_module_level_caches_are_bounded():
    problems = []
    for module in MODULES.values():
        for node, _ in _walk(module.tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for deco in node.decorator_list:
                text = ast.unparse(deco)
                unbounded = text in ("cache", "functools.cache", "lru_cache", "functools.lru_cache") or \
                    "maxsize=None" in text or text.endswith("lru_cache()")
                if unbounded:
                    problems.append(f"{module.path.relative_to(ROOT)}:{node.lineno}: {node.name} has an unbounded "
                                    f"@{text}")
    assert not problems, "\n".join(problems)


def test_the_torch_free_side_imports_with_torch_blocked():
    """Importing core and every UI/API module must work on a machine without torch."""
    core = [name for name in MODULES if name.startswith("pipelines.core")]
    ui = [name for name in MODULES if name.startswith("webui")]
    script = textwrap.dedent(f"""
        import importlib, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {[m.split('.')[0] for m in TORCH_SIDE]!r}:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        for name in {core + ui!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not leaked, leaked
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


# --- EngineAPI --------------------------------------------------------------------------------------

def _protocol_members() -> dict[str, object]:
    members = {}
    for name, value in vars(EngineAPI).items():
        if name.startswith("_"):
            continue
        members[name] = value
    for name in getattr(EngineAPI, "__annotations__", {}):
        members.setdefault(name, None)
    return members


def _parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    params = list(inspect.signature(function).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return [(p.name, p.kind) for p in params]


def api_differences(candidate) -> list[str]:
    """How `candidate` (a class or an instance) differs from EngineAPI."""
    cls = candidate if isinstance(candidate, type) else type(candidate)
    problems = []
    for name, member in _protocol_members().items():
        if callable(member) and not isinstance(member, property):
            implementation = getattr(cls, name, None)
            if implementation is None or not callable(implementation):
                problems.append(f"{cls.__name__}.{name}: missing")
                continue
            if _parameters(implementation) != _parameters(member):
                problems.append(f"{cls.__name__}.{name}{inspect.signature(implementation)} != "
                                f"EngineAPI.{name}{inspect.signature(member)}")
        elif isinstance(member, property):
            if not hasattr(cls, name) and not (not isinstance(candidate, type) and hasattr(candidate, name)):
                problems.append(f"{cls.__name__}.{name}: missing property")
        elif not isinstance(candidate, type) and not hasattr(candidate, name):
            problems.append(f"{cls.__name__}.{name}: missing attribute")
    return problems


def test_api_differences_sees_a_drifted_engine():
    """The check below would catch a stand-in that drifted (guards against a check that cannot fail)."""
    class Drifted:
        def generate(self, request, on_progress=None):  # positional callback, missing the rest
            return None

    problems = api_differences(Drifted())
    assert any("generate" in p for p in problems)
    assert any("list_checkpoints: missing" in p for p in problems)
    assert any("queue: missing attribute" in p for p in problems)


def test_the_engine_speaks_engine_api(tmp_path):
    from pipelines.engine import Engine  # torch: only this test needs it

    engine = Engine(Paths(models_dir=tmp_path / "models", data_dir=tmp_path / "data", outdir=tmp_path / "out"))
    assert api_differences(engine) == []
    assert isinstance(engine, EngineAPI)


@pytest.mark.parametrize("where", ["test_webui", "test_lora_networks_tab"])
def test_the_ui_tests_fake_engines_speak_engine_api(where):
    module = importlib.import_module(where)  # tests/ is on sys.path (conftest.py)
    assert api_differences(module.FakeEngine()) == []
