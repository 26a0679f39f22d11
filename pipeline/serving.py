"""The name under which models registered before the package had layers find their code.

Their logged `mlflow_model.py` runs `from pipeline.serving import VAEModel`; with this name a
process that has this package imported (every `mnist-vae` command) still loads them.
"""

from pipeline.tracking.pyfunc import VAEModel

__all__ = ["VAEModel"]
