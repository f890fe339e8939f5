"""Accuracy as an `evaluate` metric that loads offline: ``evaluate.load("examples/metrics/accuracy")``.

`evaluate.load("accuracy")` fetches its script from the Hub; this one ships with the examples instead.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to their references: (number correct) / (number of examples)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    normalize (bool): return the fraction (default) instead of the count of correct predictions.
    sample_weight (list of float, optional): per-example weights.
Returns:
    accuracy (float): in [0, 1] with normalize=True, else the (weighted) count of correct predictions.
Example:
    >>> accuracy = evaluate.load("examples/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(correct.shape, dtype=np.float64) if sample_weight is None else np.asarray(sample_weight)
        hits = float((correct * weights).sum())
        return {"accuracy": hits / float(weights.sum()) if normalize else hits}
