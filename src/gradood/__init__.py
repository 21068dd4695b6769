"""gradood: post-hoc out-of-distribution detection for trained PyTorch classifiers.

Typical use::

    import gradood
    probe = gradood.Probe(model)                       # finds the classifier head
    train = probe.signals(train_loader)                # lazy: one pass when a detector asks
    det = gradood.create("rg").fit(train)              # every score: higher = more in-distribution
    s_id = det.score(probe.signals(test_loader))
    s_ood = det.score(probe.signals(ood_loader))
    print(gradood.evaluate(s_id, s_ood))               # AUROC, FPR95, AUPR-In/Out, ...
"""

from .deploy import Guard, load_detector
from .detectors import Detector, available, create, describe
from .errors import (ChecksumError, ConfigError, GradoodError, InputError, ModelError, NotApplicableError,
                     NotFittedError, OutputError, TuningDataError)
from .probe import Probe
from .signals import FEATURES, LOGITS, Request, Signals, Tap
from .shared_pass import require_for, requests_for, signals_for

__version__ = "0.1.0"


def evaluate(scores_id, scores_ood, **kwargs):
    """Evaluation metrics for ID-scores (higher = more ID); see :func:`gradood.metrics.evaluate`."""
    from .metrics import evaluate as _evaluate

    return _evaluate(scores_id, scores_ood, **kwargs)


__all__ = [
    "Probe", "Signals", "Request", "Tap", "LOGITS", "FEATURES", "Detector", "available", "create", "describe",
    "signals_for", "require_for", "requests_for",
    "evaluate", "GradoodError", "InputError", "ConfigError", "ModelError", "NotApplicableError", "NotFittedError", "ChecksumError",
    "TuningDataError", "OutputError", "load_detector", "Guard", "__version__",
]
