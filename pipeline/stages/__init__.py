"""The DVC stages, one thin module each: read params, call the library, write outputs.

Run as `python -m pipeline.stages.<name>`; dvc.yaml lists each stage's command, deps and outs.
"""
