"""isstad-plugin: the ISSTAD anomaly detector as an anomalib model.

Importing this package registers :class:`Isstad` as a direct subclass of
``anomalib.models.AnomalibModule``, so ``anomalib.models.get_model("isstad")`` and
``anomalib train --model isstad`` find it (the start-up hook in ``isstad_plugin_hook`` imports it
automatically whenever anomalib's model package is imported).
"""

from .models import Cutpaste, Isstad
from .registration import register_with_anomalib

register_with_anomalib()

__all__ = ["Cutpaste", "Isstad"]
__version__ = "0.1.0"
