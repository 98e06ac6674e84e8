"""CutPaste: self-supervised learning for anomaly detection and localisation (Li et al., CVPR 2021)."""

from .lightning_model import Cutpaste

__all__ = ["Cutpaste"]
