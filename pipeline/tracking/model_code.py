"""MLflow's models-from-code entry point for the logged VAE (see `serving.py`).

MLflow stores this file in the model artifact and runs it when the model is loaded, instead of
unpickling a Python object.
"""

from mlflow.models import set_model

from pipeline.tracking.pyfunc import VAEModel

set_model(VAEModel())
