"""vexport's import structure, read statically (ast, nothing imported): no import circle, and no module imports
from a layer above its own (cli -> verbs -> stages -> backends/kernels -> core). Lazy imports inside functions
count: they are arrows too."""

from __future__ import annotations

import ast
from pathlib import Path

import vexport

PACKAGE = Path(vexport.__file__).parent

# Highest first. A module's layer is that of the longest name here that is it or a package above it.
LAYERS: dict[str, list[str]] = {
    "cli": ["vexport.cli", "vexport.__main__"],
    "verbs": [
        "vexport",  # the package: load, export, check, score
        "vexport.runtime",  # load
        "vexport.checker",  # check
        "vexport.scoring",  # score (local and Ray engines)
        "vexport.export",  # the package's __init__: the export verb
        "vexport.export.tensorrt_chain",  # TensorRT-bound ONNX -> check -> engine
        "vexport.serve",  # serve: the HTTP server over load
        "vexport.client",  # the HTTP client of serve
        "vexport.decoding.generate_file",  # generate: the searches over load, JSONL in and out
    ],
    "stages": ["vexport.export.", "vexport.quant", "vexport.decoding", "vexport.report", "vexport.parity",
               "vexport.evalset", "vexport.calibration", "vexport.tiny", "vexport.trained"],
    "backends/kernels": ["vexport.backends", "vexport.kernels", "vexport.head", "vexport.batching"],
    # what every layer reads: errors, files, the manifest and intake, the GPTQ v1 format itself
    "core": ["vexport.errors", "vexport.safety", "vexport.paths", "vexport.progress", "vexport.jsonl",
             "vexport.manifest", "vexport.model", "vexport.tensors",
             "vexport.artifact", "vexport.quant.types", "vexport.quant.pack",
             "vexport.quant.checkpoint", "vexport.quant.reference",
             "vexport.quant.dynamic"],  # GPTQModel's per-module `dynamic` rules: part of the checkpoint format
}
RANK = {prefix: len(LAYERS) - i for i, names in enumerate(LAYERS.values()) for prefix in names}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["vexport", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = module_names()


def layer_of(module: str) -> int:
    """The rank of MODULE's layer: exact names first, then the longest package prefix ("vexport.export." is
    every module inside vexport/export/, not the package's own __init__)."""
    if module in RANK:
        return RANK[module]
    prefixes = [p for p in RANK if (p.endswith(".") and module.startswith(p)) or module.startswith(p + ".")]
    assert prefixes, f"{module} is in no layer of tests/test_layers.py LAYERS: add it"
    return RANK[max(prefixes, key=len)]


def imports_of(module: str) -> set[str]:
    """The vexport modules MODULE imports (a ``from X import name`` of a submodule counts as that submodule)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__ is free
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_from_a_layer_above():
    names = {rank: name for name, rank in zip(LAYERS, range(len(LAYERS), 0, -1))}
    upward = [f"{m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})"
              for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "imports from a layer above:\n" + "\n".join(upward)


def test_no_import_circle():
    def circle_from(start: str) -> list[str] | None:
        path, seen = [start], {start}

        def walk(node: str) -> list[str] | None:
            for target in sorted(GRAPH[node]):
                if target == start:
                    return [*path, start]
                if target not in seen:
                    seen.add(target)
                    path.append(target)
                    if found := walk(target):
                        return found
                    path.pop()
            return None

        return walk(start)

    circles = [" -> ".join(c) for m in sorted(GRAPH) if (c := circle_from(m))]
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checks_see_a_circle_and_an_upward_arrow():
    """The two rules catch what they are for, on a made-up graph."""
    assert layer_of("vexport.export.onnx") < layer_of("vexport.export") == layer_of("vexport.checker")
    assert layer_of("vexport.backends.tensorrt") < layer_of("vexport.export.tensorrt") < layer_of("vexport.cli")
    saved = dict(GRAPH)
    try:
        GRAPH["vexport.errors"] = {"vexport.cli"}
        for check in (test_no_module_imports_from_a_layer_above, test_no_import_circle):
            try:
                check()
            except AssertionError:
                continue
            raise AssertionError(f"{check.__name__} missed errors -> cli")
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
