"""`mnist-vae explore`: a page to play with the registered VAE, on 127.0.0.1, built with Gradio.

Everything stays on this machine: Gradio's analytics are off, no share link is made, the fonts
are Gradio's own local ones, and the page asks nothing of other hosts (a browser test checks it).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio reads it at import

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.commands.latent import Explorer, InputError, mnist_like, reading, strip  # noqa: E402

SLIDERS = 6  # the latent units a person can move, most used first
TEST_DIGITS = 2000  # the test digits behind the 2-D view and the interpolations


class LatentView:
    """The test digits' posterior means in 2-D (PCA beyond two units), drawn once; a drawn digit
    is marked on a copy in a millisecond, where redrawing the figure took a quarter second."""

    def __init__(self, explorer: Explorer) -> None:
        fig = Figure(figsize=(5, 4.4), dpi=100)
        ax = fig.subplots()
        plane = explorer.plane
        points = ax.scatter(plane[:, 0], plane[:, 1], c=explorer.test_labels, cmap="tab10", s=4)
        fig.colorbar(points, ax=ax, ticks=range(10), label="test digit's label")
        two = explorer.latent_dim <= 2
        ax.set(xlabel="z1" if two else "PC 1", ylabel="z2" if two else "PC 2")
        ax.set_title("Your digit (+) among the test digits")
        fig.tight_layout()
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        self.picture = np.asarray(canvas.buffer_rgba())[..., :3].copy()
        self.to_pixels, self.height = ax.transData.transform, self.picture.shape[0]

    def marked(self, point: np.ndarray | None = None) -> np.ndarray:
        """The view, with `point` (2-D, in the plot's units) as a black + edged in white."""
        picture = self.picture.copy()
        if point is not None:
            x, y = self.to_pixels(np.asarray(point, float).reshape(1, 2))[0]
            row, col = round(self.height - y), round(x)
            for colour, half, width in ((255, 11, 3), (0, 10, 1)):
                picture[
                    max(row - width, 0) : row + width + 1, max(col - half, 0) : col + half + 1
                ] = colour
                picture[
                    max(row - half, 0) : row + half + 1, max(col - width, 0) : col + width + 1
                ] = colour
        return picture


def build(explorer: Explorer, title: str) -> gr.Blocks:
    units = explorer.ranked[: min(SLIDERS, explorer.latent_dim)]
    view_of = LatentView(explorer)

    def draw(canvas: dict | None, upload: np.ndarray | None):
        started = time.perf_counter()
        try:
            picture = upload if upload is not None else (canvas or {}).get("composite")
            pixels, notes = mnist_like(picture)
        except InputError as error:
            return None, f"**{error}**", view_of.marked()
        recon, score, point = explorer.look(pixels)
        picture = view_of.marked(point)
        took = (time.perf_counter() - started) * 1000
        said = f"**{reading(score)}**" + (f" ({notes})" if notes else "")
        said += f"  \n{took:.0f} ms from the drawing to these answers"
        return strip(np.stack([pixels, recon]), scale=6), said, picture

    def walk(*values: float):
        return strip(explorer.walk(dict(zip(units, values, strict=True))), scale=8)

    def interpolate(first: float, last: float, by_label: bool, steps: float):
        try:
            if by_label:
                first, last = explorer.first_of(int(first)), explorer.first_of(int(last))
            frames = explorer.interpolate(int(first), int(last), int(steps))
        except (InputError, IndexError) as error:
            said = str(error) if isinstance(error, InputError) else "No test digit has that label."
            raise gr.Error(said) from None
        return strip(frames, scale=3)

    def sample(n: float, seed: float):
        return strip(explorer.sample(int(n), int(seed)), scale=2, columns=8)

    with gr.Blocks(title="MNIST VAE explorer", analytics_enabled=False) as page:
        gr.Markdown(f"# MNIST VAE explorer\n{title}")
        with gr.Tab("Draw a digit"):
            with gr.Row():
                with gr.Column():
                    canvas = gr.Sketchpad(
                        label="draw here (or upload below)",
                        type="numpy",
                        image_mode="RGBA",
                        canvas_size=(280, 280),
                        brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                        layers=False,
                        elem_id="canvas",
                    )
                    upload = gr.Image(label="or upload a PNG", type="numpy", elem_id="upload")
                with gr.Column():
                    shown = gr.Image(label="your digit as MNIST | its reconstruction",
                                     elem_id="reconstruction", buttons=["download"])  # fmt: skip
                    verdict = gr.Markdown(elem_id="score")
                    view = gr.Image(view_of.marked(), label="latent space", elem_id="view",
                                    buttons=["fullscreen"])  # fmt: skip
            for event in (canvas.change, upload.change):
                event(draw, [canvas, upload], [shown, verdict, view], show_progress="hidden")
        with gr.Tab("Walk the latent space"):
            kl = ", ".join(f"z{u} {explorer.kl[u]:.1f}" for u in units)
            gr.Markdown(f"The {len(units)} units the model uses most (KL in nats: {kl}); "
                        "the others stay at the test digits' mean.")  # fmt: skip
            sliders = [
                gr.Slider(-3, 3, value=round(float(explorer.mu[:, u].mean()), 2), step=0.05,
                          label=f"z{u}", elem_id=f"z{u}")
                for u in units
            ]  # fmt: skip
            decoded = gr.Image(walk(*(s.value for s in sliders)), label="decoded", elem_id="walk",
                               buttons=["download"])  # fmt: skip
            for slider in sliders:
                slider.change(walk, sliders, decoded, show_progress="hidden")
        with gr.Tab("Interpolate"):
            with gr.Row():
                first = gr.Number(3, label="from (test digit index, or label)", precision=0)
                last = gr.Number(8, label="to", precision=0)
                by_label = gr.Checkbox(True, label="by label: the first test digit of each")
                steps = gr.Slider(3, 16, value=10, step=1, label="frames")
            go = gr.Button("Interpolate", elem_id="interpolate")
            frames = gr.Image(label="frames", elem_id="frames", buttons=["download"])
            go.click(interpolate, [first, last, by_label, steps], frames)
        with gr.Tab("Sample"):
            with gr.Row():
                n = gr.Slider(8, 64, value=32, step=8, label="digits")
                seed = gr.Number(0, label="seed", precision=0)
            make = gr.Button("Sample from the prior", elem_id="sample")
            grid = gr.Image(
                label="new digits, z ~ N(0, I)", elem_id="samples", buttons=["download"]
            )
            make.click(sample, [n, seed], grid)
    return page
