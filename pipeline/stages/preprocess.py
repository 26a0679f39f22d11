"""DVC stage `preprocess`: raw IDX files -> train/test tensors (loaded as float32 in [0, 1])."""

from collections import Counter
from pathlib import Path

from torchvision.datasets import MNIST

from pipeline import runtime
from pipeline.config import load_params
from pipeline.data.files import write_json
from pipeline.data.mnist import DataError, raw_dir, save_split
from pipeline.errors import reports_errors
from pipeline.paths import CLASS_COUNTS, PROCESSED, RAW_ROOT


def preprocess(raw_root: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Write train.pt and test.pt under `out_dir`; return the number of images per class."""
    counts = {}
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = MNIST(root=raw_root, train=train, download=False)
        except RuntimeError:
            missing = f"{raw_dir(raw_root)}: MNIST files not found; run `dvc repro download`"
            raise DataError(missing) from None
        save_split(out_dir / f"{split}.safetensors", dataset.data, dataset.targets)
        per_class = Counter(dataset.targets.tolist())
        counts[split] = {str(digit): per_class[digit] for digit in range(10)}
    return counts


@reports_errors
def main() -> None:
    runtime.start()
    load_params()  # validate params.yaml like every stage, though nothing here is tunable
    counts = preprocess(RAW_ROOT, PROCESSED)
    write_json(CLASS_COUNTS, counts)
    sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in counts.items())
    print(f"wrote {PROCESSED}/train.safetensors and test.safetensors ({sizes} images)")


if __name__ == "__main__":
    main()
