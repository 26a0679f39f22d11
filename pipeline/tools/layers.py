"""The package's import graph by layer, drawn from the code: `python -m pipeline.tools.layers`
prints it as Markdown with a Mermaid diagram (docs/layers.md is its output). The layers are
import-linter's contract in pyproject.toml, which `lint-imports` enforces; grimp, its graph
library, reads the imports."""

from __future__ import annotations

from collections import Counter
from functools import partial

import tomllib

from pipeline.paths import REPO_ROOT

# What each layer of the contract holds, lowest first (the contract lists them highest first).
LAYERS = {
    "foundation": "config, errors, exact, paths, runtime, validate: params.yaml and its checks, "
    "one-line errors, set-up",
    "vae": "the science: the handout's model, the training loop, evaluation, pictures; torch",
    "data": "files on disk: MNIST and its checksums, splits, weights, checkpoints",
    "tracking": "MLflow: the store, runs, the pyfunc model (and pipeline.serving, its older "
    "import name), the registry",
    "stages": "the five DVC stages: read params, call the layers, write outputs",
    "tools": "beside the pipeline: sweeps, the local team stack, the benchmark, this graph",
    "commands": "mnist-vae: what people run",
}


def contract_layers() -> list[list[str]]:
    """The modules of each layer of pyproject.toml's layers contract, lowest first."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in layers[::-1]]


def layer_of(module: str, layers: list[list[str]] | None = None) -> str:
    """The name (a key of LAYERS) of the contract's layer that holds `module`."""
    for name, modules in zip(LAYERS, layers or contract_layers(), strict=True):
        if any(module == m or module.startswith(f"{m}.") for m in modules):
            return name
    raise KeyError(f"{module} is in no layer of pyproject.toml's import-linter contract")


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (not the package itself)."""
    import grimp  # a dev tool's import: grimp comes with import-linter

    graph = grimp.build_graph("pipeline")
    return {
        module: graph.find_modules_directly_imported_by(module) - {"pipeline"}
        for module in sorted(graph.modules - {"pipeline"})
    }


def markdown(graph: dict[str, set[str]]) -> str:
    layer = partial(layer_of, layers=contract_layers())
    arrows = Counter(
        (layer(module), layer(target))
        for module, targets in graph.items()
        for target in targets
        if layer(module) != layer(target)
    )
    lines = [
        "# The package's layers and imports",
        "",
        "Written by `python -m pipeline.tools.layers` from the code; the layers are the "
        "import-linter contract in `pyproject.toml`, and `tests/test_layers.py` fails when an "
        "import goes up a layer (`lint-imports`) or when this page is out of date. An arrow reads "
        '"imports", its number counts the imports between two layers.',
        "",
        "```mermaid",
        "flowchart TD",
    ]
    folders = {layer(module) for module in graph if module.count(".") > 1}
    lines += [
        f'    {name}["{name}{"/" if name in folders else ""}: {what}"]'
        for name, what in LAYERS.items()
    ]
    lines += [f"    {a} -->|{n}| {b}" for (a, b), n in sorted(arrows.items())]
    lines += ["```", "", "| module | layer | imports from the package |", "| --- | --- | --- |"]
    for module, targets in graph.items():
        listed = ", ".join(f"`{t}`" for t in sorted(targets)) or "none"
        lines.append(f"| `{module}` | {layer(module)} | {listed} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(imports()), end="")
