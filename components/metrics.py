"""How every component reports a stage's headline figures to KFP: one filter and one naming rule.

The same rule as the stage's MLflow run (`mmsae.tracking.metric_values`): finite real numbers only (bools,
text and NaN left out), nested keys and path separators turned into dots.
"""

from collections.abc import Mapping
from typing import Any


def log_figures(metrics, figures: Mapping[str, Any]) -> dict[str, float]:
    """Log ``figures`` into a KFP ``Metrics`` output artifact; returns what was logged."""
    from mmsae.tracking import metric_values

    values = metric_values(figures)
    for name, value in values.items():
        metrics.log_metric(name, value)
    return values
