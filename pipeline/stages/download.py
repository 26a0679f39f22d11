"""DVC stage `download`: the four canonical MNIST IDX files, verified, under data/raw."""

from pipeline import runtime
from pipeline.config import load_params
from pipeline.data.mnist import download_mnist, raw_dir
from pipeline.errors import reports_errors
from pipeline.paths import RAW_ROOT


@reports_errors
def main() -> None:
    runtime.start()
    params = load_params()
    source = download_mnist(RAW_ROOT, params.data.source, params.data.local_dir)
    how = "already present and verified" if source == "present" else f"verified, from {source}"
    print(f"MNIST IDX files in {raw_dir(RAW_ROOT)}: {how}")


if __name__ == "__main__":
    main()
