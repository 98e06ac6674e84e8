"""Models shipped by isstad-plugin."""

from .isstad import Isstad

__all__ = ["Isstad"]
