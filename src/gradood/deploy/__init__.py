"""Deploying a fitted detector: save/load (safetensors + JSON, no pickle), a conformal threshold with a stated
guarantee, accept/reject decisions, and :class:`Guard`, a module that returns logits with OOD decisions.

Typical use::

    det = gradood.create("knn").fit(probe.signals(train_loader))
    det.calibrate(probe.signals(id_val_loader), tpr=0.95)    # threshold_: <= 5 % of new ID samples rejected
    det.save("knn-mnist")
    det = gradood.load_detector("knn-mnist")
    guard = gradood.Guard(model, det)
    out = guard(x)                     # out.logits, out.scores, out.accepted, out.p_values
"""

from .conformal import conformal_p_values, conformal_threshold, min_calibration_size
from .contract import weights_fingerprint
from .persist import VersionWarning, load_detector, read_record, save_detector
from .guard import Guard, GuardOutput


__all__ = ["Guard", "GuardOutput", "load_detector", "save_detector", "read_record", "VersionWarning",
           "conformal_threshold", "conformal_p_values", "min_calibration_size", "weights_fingerprint"]
