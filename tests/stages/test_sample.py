"""The sample stage: every figure as a PNG and in the run, each showing what its title says."""

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from helpers.repo import FIGURE_NAMES
from helpers.workdir import train_tiny
from pipeline.config import load_params
from pipeline.data.files import read_csv_numbers
from pipeline.paths import FIGURES, TRAIN_HISTORY
from pipeline.stages.sample import run_sampling
from pipeline.vae.figures import draw_all


def test_sample_writes_every_figure_as_a_png_and_logs_it(workdir: Path) -> None:
    run_id = train_tiny()
    names = run_sampling(load_params())
    expected_sizes = {
        "generated": (510, 440),
        "latent_space": (700, 600),
        "manifold": (800, 800),
        "training_curves": (1300, 380),
    }
    for name in names:
        with Image.open(FIGURES / f"{name}.png") as image:
            assert image.format == "PNG"
            image.load()  # a truncated file fails here
            if name in expected_sizes:
                assert image.size == expected_sizes[name], name
    assert set(names) == FIGURE_NAMES
    logged = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").list_artifacts(run_id, "figures")
    assert {a.path for a in logged} >= {f"figures/{name}.png" for name in names}


def test_every_figure_has_a_title_and_the_latent_plot_shows_ten_classes(workdir: Path) -> None:
    train_tiny()
    from pipeline.data.splits import load_split
    from pipeline.data.weights import load_vae
    from pipeline.paths import TEST_SPLIT, WEIGHTS

    images, labels = load_split(TEST_SPLIT)
    drawn = draw_all(
        load_vae(WEIGHTS), images, labels, read_csv_numbers(TRAIN_HISTORY), load_params().sample
    )
    for name, fig in drawn.items():
        assert all(ax.get_title() for ax in fig.axes), name
    latent = drawn["latent_space"].axes[0]
    assert [t.get_text() for t in latent.get_legend().get_texts()] == [str(d) for d in range(10)]
    assert latent.get_xlabel().startswith("PC 1") and latent.get_ylabel().startswith("PC 2")


def grid_cells(figure, rows: int, cols: int) -> torch.Tensor:
    """The 28x28 cells of the digit grid a figure shows, as (rows, cols, 784) in [0, 1]."""
    picture = torch.from_numpy(figure.axes[0].images[0].get_array()[..., 0].copy()).float() / 255
    cells = [
        picture[2 + 30 * r : 30 + 30 * r, 2 + 30 * c : 30 + 30 * c].reshape(-1)
        for r in range(rows)
        for c in range(cols)
    ]
    return torch.stack(cells).reshape(rows, cols, 784)


def test_the_reconstructions_figure_shows_test_digits_over_their_reconstructions(
    workdir: Path, set_params
) -> None:
    from pipeline.data.splits import load_split
    from pipeline.data.weights import load_vae
    from pipeline.paths import TEST_SPLIT, WEIGHTS

    set_params(workdir, train={"epochs": 15, "lr": 0.01})  # long enough to tell digits apart
    train_tiny()
    images, labels = load_split(TEST_SPLIT)
    cfg = load_params().sample
    drawn = draw_all(load_vae(WEIGHTS), images, labels, read_csv_numbers(TRAIN_HISTORY), cfg)
    originals, reconstructed = grid_cells(drawn["reconstructions"], 2, cfg.n_reconstructions)
    # The top row: test digits (as the grid's uint8 rounding shows them).
    distance_to_test_set = torch.cdist(originals, images)
    assert (distance_to_test_set.min(dim=1).values < 0.05).all()
    # The bottom row: not the originals, but each nearer its own original than the others are.
    distances = torch.cdist(reconstructed, originals)
    assert (distances.diagonal() > 1.0).all()
    others = (distances.sum(1) - distances.diagonal()) / (len(distances) - 1)
    assert (distances.diagonal() < others).float().mean() > 0.9
