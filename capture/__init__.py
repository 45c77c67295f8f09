"""Capture: models, attention hooks, interventions and runs.  The only package that touches torch.

Importing `capture` itself is torch-free (the types); `capture.run`, `capture.registry` and
`capture.attention` load torch when imported.
"""
from capture.interventions import HeadEdit, Intervention, InterventionError
from capture.types import Capture, ModelMeta, Output, RunSpec

__all__ = ["Capture", "HeadEdit", "Intervention", "InterventionError", "ModelMeta", "Output", "RunSpec"]
