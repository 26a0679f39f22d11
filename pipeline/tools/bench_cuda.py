"""`make bench` on a CUDA GPU: the training step eager, graphed (`train.cuda_graphs`), and graphed
with its forward and backward compiled (`train.compile`).

1. The step, each way, in the lab's shape (params.yaml: one epoch of 128-image batches) and in
   the paper's (presets/burda2015.yaml: 784-200-200-50 tanh, batches of 20, binarised), each as
   a ratio to its arithmetic floor: the step's matrix products (forward, weight gradients, input
   gradients but the images') in float32 FLOPs over the rate of one large float32 product
   measured here, first; and the GPU kernels (and copies) one eager step launches, which is what
   a replay still runs one after another. The first epoch of each path is its warm-up (and its
   compilation) and is not counted.
2. The lab's 10 epochs as the train stage runs them, graphed twice, eager once and compiled once:
   the CI tolerance of the lab's curve, and whether the same seed gives the same numbers.
3. The paper's protocol graphed and compiled for `paper_epochs` epochs, its 3,280 extrapolated
   from their pace, and its evaluation: the IWAE bound at k = 5,000 on the test set
   (vae/evaluation.py's chunks, its progress bar on a terminal).

No MLflow: the numbers are printed, and written as JSON to `out` when given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Params, load_params, load_params_with, read_preset
from pipeline.data.splits import load_test_set, training_images
from pipeline.paths import TEST_SPLIT, TRAIN_SPLIT
from pipeline.tools.bench_step import verdict
from pipeline.vae.cuda_graph import capture
from pipeline.vae.evaluation import evaluate
from pipeline.vae.lab import within_tolerance
from pipeline.vae.step import autograd_step, forward_of
from pipeline.vae.training import fit, learning_rate, train_epoch, vae_and_optimizer

TARGET_LAB_EPOCH_S = 0.050  # the lab's epoch, graphed
PAPER_STEPS = 500  # steps of the paper's shape a timed epoch takes (eager is slow)
PAPER_EPOCHS = 3280


def float32_rate(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of one large float32 matrix product on `device` (TF32 off, as training runs)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    c = torch.empty(n, n, device=device)
    for _ in range(3):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(a, b, out=c)
    end.record()
    end.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1000)


def matmul_flops_per_image(model: nn.Module) -> int:
    """The float32 operations of a training step's matrix products, per image in the batch."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    products = sum(m.in_features * m.out_features for m in linears)
    first = linears[0]  # no gradient flows back into the images
    return 2 * (3 * products - first.in_features * first.out_features)


def time_epochs(params: Params, images: torch.Tensor, path: str, epochs: int) -> list[float]:
    """Seconds of each of `epochs` training epochs along `path` (eager, graphed, compiled) on
    `images`, after a warm-up epoch."""
    cfg, binarize = params.train, params.data.binarize == "dynamic"
    torch.manual_seed(cfg.seed)
    model, optimizer = vae_and_optimizer(params.model, params.train, images)
    forward = forward_of("on" if path == "compiled" else "off", images.device)
    steps = None
    if path != "eager":
        step = partial(autograd_step, forward=forward)
        steps = capture(step, model, optimizer, images, cfg.batch_size, binarize, "on")
    seconds = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        train_epoch(model, optimizer, images, cfg.batch_size, binarize, epoch, epochs, None,
                    graphed=steps, forward=forward)  # fmt: skip
        seconds.append(time.perf_counter() - start)  # train_epoch reads its sums: synchronised
    return seconds[1:]


def kernels_per_step(params: Params, images: torch.Tensor, compiled: bool) -> int:
    """The GPU kernels and copies that one eager step launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, binarize = params.train, params.data.binarize == "dynamic"
    model, optimizer = vae_and_optimizer(params.model, params.train, images)
    forward = forward_of("on" if compiled else "off", images.device)
    index, terms = torch.arange(cfg.batch_size, device=images.device), torch.zeros(2).cuda()
    step = partial(autograd_step, model, optimizer, images, index, binarize, terms, forward)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA)


PATHS = ("eager", "graphed", "compiled")  # compiled: graphed too


def compare_step(name: str, params: Params, images: torch.Tensor, rate: float, epochs: int) -> dict:
    model, _ = vae_and_optimizer(params.model, params.train, images[:1])
    floor = len(images) * matmul_flops_per_image(model) / rate
    steps = -(-len(images) // params.train.batch_size)
    result = {"images": len(images), "steps": steps, "floor_s": floor}
    for path in PATHS:
        seconds = time_epochs(params, images, path, epochs)
        result[path] = {"best_s": min(seconds), "median_s": statistics.median(seconds)}
    for path in ("eager", "compiled"):
        result[path]["kernels"] = kernels_per_step(params, images, path == "compiled")
    print(
        f"{name}: {len(images)} images, {steps} steps an epoch, best of {epochs} epochs; "
        f"arithmetic floor {floor * 1e3:.2f} ms"
    )
    for path in PATHS:
        seconds = result[path]["best_s"]
        kernels = result["compiled" if path == "compiled" else "eager"]["kernels"]
        print(
            f"  {path:8s} {seconds * 1e3:8.1f} ms an epoch, {steps / seconds:9.0f} steps/s, "
            f"{seconds / floor:6.1f}x the floor; {kernels} kernels a step"
        )
    eager = result["eager"]["best_s"]
    graphed, compiled = result["graphed"]["best_s"], result["compiled"]["best_s"]
    print(
        f"  graphed is {eager / graphed:.1f}x faster than eager, compiled {eager / compiled:.1f}x"
    )
    return result


def lab_run(params: Params, cuda_graphs: str, compile: str = "off") -> tuple[list[dict], nn.Module]:
    """The train stage's epochs (its seed, data, model, optimizer and schedule), without MLflow."""
    cfg, data = params.train, params.data
    device = torch.device("cuda")
    torch.manual_seed(cfg.seed)
    train_x = training_images(TRAIN_SPLIT, data.holdout, device)
    binarize = data.binarize == "dynamic"
    test_x, _ = load_test_set(TEST_SPLIT, binarize, data.binarize_seed, device)
    model, optimizer = vae_and_optimizer(params.model, cfg, train_x)
    rows = fit(
        model, optimizer, train_x, test_x, first_epoch=1, epochs=cfg.epochs,
        batch_size=cfg.batch_size, binarize=binarize,
        lr_at=partial(learning_rate, cfg.schedule, cfg.lr), cuda_graphs=cuda_graphs,
        forward=forward_of(compile, device),
    )  # fmt: skip
    return [asdict(row) for row in rows], model


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def lab_curve(params: Params) -> dict:
    first, _ = lab_run(params, "on")
    second, _ = lab_run(params, "on")
    eager, _ = lab_run(params, "off")
    compiled, _ = lab_run(params, "on", "on")
    losses = [row["train_loss"] for row in first]
    same = without_seconds(first) == without_seconds(second)
    passed = within_tolerance(losses)
    epoch_s = [row["seconds"] for row in first + second]
    print(
        f"the lab's {len(losses)} epochs, graphed: train loss "
        + ", ".join(f"{x:.2f}" for x in losses)
    )
    print(f"  within the CI tolerance of the lab's curve: {verdict(passed)}")
    print(f"  the same seed twice, the same numbers in every column: {verdict(same)}")
    print(
        f"  epoch seconds graphed: best {min(epoch_s) * 1e3:.1f} ms, median "
        f"{statistics.median(epoch_s) * 1e3:.1f} ms (target <= {TARGET_LAB_EPOCH_S * 1e3:.0f} ms) "
        f"{verdict(min(epoch_s) <= TARGET_LAB_EPOCH_S)}"
    )
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(first, eager, strict=True))
    print(
        f"  eager, same seed: final train loss {eager[-1]['train_loss']:.4f} against "
        f"{first[-1]['train_loss']:.4f} graphed (largest gap over the epochs {gap:.2e}); eager "
        f"epoch median {statistics.median(row['seconds'] for row in eager) * 1e3:.0f} ms"
    )
    compiled_losses = [row["train_loss"] for row in compiled]
    compiled_s = [row["seconds"] for row in compiled[1:]]  # as the other paths: epoch 1 left out
    print(
        f"  compiled and graphed: train loss {compiled_losses[-1]:.4f} at epoch "
        f"{len(compiled_losses)}, within the CI tolerance: "
        f"{verdict(within_tolerance(compiled_losses))}; epochs 2-{len(compiled)} best "
        f"{min(compiled_s) * 1e3:.1f} ms, median {statistics.median(compiled_s) * 1e3:.1f} ms "
        f"{verdict(min(compiled_s) <= TARGET_LAB_EPOCH_S)}"
    )
    return {"graphed": first, "graphed_again": second, "eager": eager, "compiled": compiled,
            "within_tolerance": passed, "same_numbers": same}  # fmt: skip


def paper_protocol(params: Params, epochs: int) -> dict:
    short = replace(params, train=replace(params.train, epochs=epochs))
    start = time.perf_counter()
    rows, model = lab_run(short, "on", "on")
    training_s = time.perf_counter() - start
    cfg = params.evaluate
    device = torch.device("cuda")
    images, labels = load_test_set(TEST_SPLIT, True, params.data.binarize_seed, device)
    start = time.perf_counter()
    metrics = evaluate(model, images, labels, k=cfg.iwae_samples, batch_size=cfg.batch_size,
                       threshold=cfg.active_unit_threshold, seed=cfg.seed)  # fmt: skip
    torch.cuda.synchronize()
    evaluation_s = time.perf_counter() - start
    per_epoch = training_s / epochs  # with the test losses and the capture (the compilation
    # too, unless this process compiled the shape already, as `run` has: then it is left out)
    full = per_epoch * PAPER_EPOCHS + evaluation_s
    print(
        f"the paper's protocol, graphed and compiled: {epochs} epochs in {training_s:.1f} s "
        f"({per_epoch:.2f} s an epoch with its test loss; median train epoch "
        f"{statistics.median(row['seconds'] for row in rows):.2f} s); test loss "
        f"{rows[-1]['test_loss']:.2f} after epoch {epochs}"
    )
    print(
        f"  IWAE k = {cfg.iwae_samples} on {len(images)} test images: {evaluation_s:.1f} s, "
        f"log p(x) {metrics['log_px_iwae']:.2f}, {metrics['active_units']} active units"
    )
    print(f"  all {PAPER_EPOCHS} epochs and the evaluation, extrapolated: {full / 60:.1f} min")
    return {"epochs": rows, "training_s": training_s, "evaluation_s": evaluation_s,
            "extrapolated_s": full, "metrics": {k: metrics[k] for k in
            ("test_loss", "log_px_iwae", "log_px_iwae_se", "active_units")}}  # fmt: skip


def run(repeats: int = 5, paper_epochs: int = 50, out: Path | None = None) -> None:
    """Every figure above, on the first CUDA device."""
    device = torch.device("cuda")
    lab = load_params()
    paper = load_params_with(read_preset("burda2015"), "preset burda2015")
    name = torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, float32 (TF32 off)")
    rate = float32_rate(device)
    print(f"float32 matrix product: {rate / 1e12:.1f} TFLOP/s (the floors' rate)")
    lab_images = training_images(TRAIN_SPLIT, lab.data.holdout, device)
    paper_images = training_images(TRAIN_SPLIT, paper.data.holdout, device)
    paper_images = paper_images[: PAPER_STEPS * paper.train.batch_size]
    report = {"device": name, "torch": torch.__version__, "float32_flops": rate}
    report["lab_step"] = compare_step("the lab's shape", lab, lab_images, rate, repeats)
    report["paper_step"] = compare_step("the paper's shape", paper, paper_images, rate, repeats)
    report["lab_curve"] = lab_curve(lab)
    report["paper"] = paper_protocol(paper, paper_epochs)
    if out is not None:
        out.write_text(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per path")
    parser.add_argument("--paper-epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    run(args.repeats, args.paper_epochs, args.out)


if __name__ == "__main__":
    main()
