"""Where the stages read and write, relative to the repository root (dvc.yaml names the same)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

RAW_ROOT = Path("data/raw")  # torchvision.datasets.MNIST(root=RAW_ROOT) reads it
PROCESSED = Path("data/processed")
TRAIN_SPLIT = PROCESSED / "train.safetensors"
TEST_SPLIT = PROCESSED / "test.safetensors"
CLASS_COUNTS = PROCESSED / "counts.json"

WEIGHTS = Path("models/vae.safetensors")
CHECKPOINT = Path("checkpoints/train.pt")  # working state for resuming, not a DVC output
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_HISTORY = Path("plots/train_history.csv")
EVAL_METRICS = Path("metrics/evaluate.json")  # headline numbers
EVAL_BREAKDOWN = Path("reports/evaluate_breakdown.json")  # per latent unit and per class
FIGURES = Path("figures")
STACK_ROOT = Path(".stack")  # `make stack`'s data, keys and logs; each user's <role>.env
