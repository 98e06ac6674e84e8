"""isstad-plugin: the ISSTAD anomaly detector (and a CutPaste baseline) as anomalib models.

Importing this package defines :class:`Isstad` and :class:`Cutpaste` as direct subclasses of
``anomalib.models.AnomalibModule`` (what ``get_model("isstad")`` and ``anomalib train --model isstad`` search) and
adds this package's model modules (:data:`PLUGIN_MODULES`) to anomalib's import allow-list
(:func:`isstad_plugin.patches.register_models`).
It writes, downloads and registers nothing else; every other change to a library is in :mod:`isstad_plugin.patches`
and applies only where it is needed. The start-up hook ``isstad_plugin_hook`` imports this package whenever
anomalib's model package is imported; if this import fails, anomalib keeps working as stock with one warning.
"""

from functools import partial

from .models import Cutpaste, Isstad
from .patches import apply, register_models

# What anomalib may import by name: our models, and only the modules that define them (never anything wider).
PLUGIN_MODELS = {"Isstad": Isstad, "Cutpaste": Cutpaste}
PLUGIN_MODULES = (
    "isstad_plugin",
    "isstad_plugin.models",
    "isstad_plugin.models.isstad",
    "isstad_plugin.models.cutpaste",
)

apply(partial(register_models, PLUGIN_MODELS, PLUGIN_MODULES),
      "get_model('isstad') and {'class_path': 'Isstad'} do not find the plugin's models")

__all__ = ["Cutpaste", "Isstad"]
__version__ = "0.1.0"
