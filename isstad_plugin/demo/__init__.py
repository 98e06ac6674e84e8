"""The embedded demo: a generated MVTec-layout data set and the end-to-end main job."""

from .dataset import DEMO_CATEGORY, make_demo_dataset

__all__ = ["DEMO_CATEGORY", "make_demo_dataset"]
