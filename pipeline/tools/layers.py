"""The package's import graph by layer, from the code itself: `python -m pipeline.tools.layers`
prints it as Markdown with a Mermaid diagram (docs/layers.md is its output), and `check` lists
every import that goes up a layer instead of down (tests/test_layers.py expects none)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own layer and the layers listed before it, never after.
LAYERS = {
    "foundation": "config, errors, exact, paths, runtime: params.yaml, one-line errors, set-up",
    "vae": "the science: the handout's model, the training loop, evaluation, pictures; torch",
    "data": "files on disk: MNIST and its checksums, splits, weights, checkpoints",
    "tracking": "MLflow: the store, runs, the pyfunc model, the registry",
    "stages": "the five DVC stages: read params, call the layers, write outputs",
    "tools": "beside the pipeline: sweeps, the local team stack, the benchmark, this graph",
    "commands": "mnist-vae: what people run",
}
TOP_LEVEL = {"__main__": "commands", "serving": "tracking"}  # other pipeline/*.py: foundation


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "foundation"
    if parts[1] in LAYERS:
        return parts[1]
    return TOP_LEVEL.get(parts[1], "foundation")


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
        graph[name] = {m for m in found if m in modules and m != name and m != "pipeline"}
    return graph


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes from a layer to a later one, as `importer -> imported`."""
    order = list(LAYERS)
    return [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in sorted(targets)
        if order.index(layer_of(target)) > order.index(layer_of(module))
    ]


def markdown(graph: dict[str, set[str]]) -> str:
    arrows = Counter(
        (layer_of(module), layer_of(target))
        for module, targets in graph.items()
        for target in targets
        if layer_of(module) != layer_of(target)
    )
    lines = [
        "# The package's layers and imports",
        "",
        "Written by `python -m pipeline.tools.layers` from the code; `tests/test_layers.py` fails "
        "when an import goes up a layer or when this page is out of date. An arrow reads "
        '"imports", its number counts the imports between two layers.',
        "",
        "```mermaid",
        "flowchart TD",
    ]
    folders = {layer_of(module) for module in graph if module.count(".") > 1}
    lines += [
        f'    {name}["{name}{"/" if name in folders else ""}: {what}"]'
        for name, what in LAYERS.items()
    ]
    lines += [f"    {a} -->|{n}| {b}" for (a, b), n in sorted(arrows.items())]
    lines += ["```", "", "| module | layer | imports from the package |", "| --- | --- | --- |"]
    for module, targets in graph.items():
        listed = ", ".join(f"`{t}`" for t in sorted(targets)) or "none"
        lines.append(f"| `{module}` | {layer_of(module)} | {listed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(imports()), end="")
