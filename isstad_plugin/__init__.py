"""isstad-plugin: the ISSTAD anomaly detector (and a CutPaste baseline) as anomalib models.

Importing this package defines :class:`Isstad` and :class:`Cutpaste` as direct subclasses of
``anomalib.models.AnomalibModule`` (what ``get_model("isstad")`` and ``anomalib train --model isstad`` search) and
adds this package's model modules to anomalib's import allow-list (:func:`isstad_plugin.patches.register_models`).
It writes, downloads and registers nothing else; every other change to a library is in :mod:`isstad_plugin.patches`
and applies only where it is needed. The start-up hook ``isstad_plugin_hook`` imports this package whenever
anomalib's model package is imported; if this import fails, anomalib keeps working as stock with one warning.
"""

from .models import Cutpaste, Isstad
from .patches import apply, register_models

apply(register_models, "get_model('isstad') and {'class_path': 'Isstad'} do not find the plugin's models")

__all__ = ["Cutpaste", "Isstad"]
__version__ = "0.1.0"
