"""Comparing an exported graph's outputs with torch's: values within a tolerance, decisions off the threshold."""

from __future__ import annotations

import numpy as np

# anomalib's post-processor normalises scores and maps so that the learnt threshold sits at 0.5.
NORMALISED_THRESHOLD = 0.5


def assert_decisions_agree(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], margin: float) -> None:
    """Labels and masks equal wherever the reference score/map is more than ``margin`` away from the threshold.

    Two runtimes that agree to ``margin`` may still decide differently on a value that lies on the threshold
    itself; exact label equality there would make the test depend on the CPU's rounding.
    """
    for name, source in (("pred_label", "pred_score"), ("pred_mask", "anomaly_map")):
        expected = np.asarray(reference[name])
        decided = np.abs(np.asarray(reference[source]) - NORMALISED_THRESHOLD) > margin
        decided = decided.reshape(expected.shape)
        actual = np.asarray(outputs[name]).reshape(expected.shape)
        np.testing.assert_array_equal(actual[decided], expected[decided], err_msg=name)
