"""Models shipped by isstad-plugin."""

from .cutpaste import Cutpaste
from .isstad import Isstad

__all__ = ["Cutpaste", "Isstad"]
