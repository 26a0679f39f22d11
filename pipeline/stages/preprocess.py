"""DVC stage `preprocess`: raw IDX files -> train/test tensors (loaded as float32 in [0, 1])."""

from pipeline import runtime
from pipeline.config import load_params
from pipeline.data.files import write_json
from pipeline.data.splits import preprocess
from pipeline.errors import reports_errors
from pipeline.paths import CLASS_COUNTS, PROCESSED, RAW_ROOT


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
