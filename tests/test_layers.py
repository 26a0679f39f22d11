"""The package's layers import downward only, and docs/layers.md draws the graph as it is."""

from helpers.repo import REPO_ROOT
from pipeline.tools.layers import LAYERS, imports, layer_of, markdown, upward


def test_every_import_goes_down_the_layers() -> None:
    assert upward(imports()) == []


def test_the_checker_sees_an_import_that_goes_up() -> None:
    graph = {"pipeline.vae.model": {"pipeline.tracking.runs"}, "pipeline.stages.train": set()}
    assert upward(graph) == ["pipeline.vae.model -> pipeline.tracking.runs"]
    assert [layer_of(m) for m in ("pipeline.errors", "pipeline.__main__")] == [
        "foundation",
        "commands",
    ]


def test_tracking_logs_what_it_is_given_and_never_imports_the_training_loop() -> None:
    graph = imports()
    tracking = [m for m in graph if layer_of(m) == "tracking"]
    assert tracking and not any("pipeline.vae.training" in graph[m] for m in tracking)
    science = [m for m in graph if layer_of(m) == "vae"]
    assert all(layer_of(t) in ("foundation", "vae") for m in science for t in graph[m])


def test_every_module_has_a_layer_and_the_docs_page_is_current() -> None:
    graph = imports()
    assert {layer_of(m) for m in graph} == set(LAYERS)
    page = (REPO_ROOT / "docs" / "layers.md").read_text()
    assert page == markdown(graph), "run: python -m pipeline.tools.layers > docs/layers.md"
