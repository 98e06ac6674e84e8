"""ISSTAD: incremental self-supervised transformer anomaly detection."""

from .lightning_model import Isstad

__all__ = ["Isstad"]
