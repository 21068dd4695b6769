"""One pass over a dataset for several detectors.

:meth:`gradood.Probe.signals` is lazy: each detector computes what *it* needs when it first asks, so with
``msp`` then ``gradnorm`` the data would be read twice (logits, then features). These helpers take the union
of what every detector in use declares and compute it in a single streaming pass::

    detectors = [gradood.create(n) for n in ("msp", "gradnorm", "knn")]
    train = gradood.signals_for(probe, train_data, detectors, fit=True)   # one pass: all that fit() reads
    for d in detectors:
        d.fit(train)
    test = gradood.signals_for(probe, test_data, detectors)               # one pass: all that score() reads

Detectors whose scoring signals depend on what they fitted (FSSD's tuned eps, the low-dimensional gradient
basis, tuned ODIN/GRODIN) must be fitted before their scoring signals can be requested.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from .detectors.base import Detector
from .errors import InputError, NotFittedError
from .signals import Request, Signals

log = logging.getLogger(__name__)

def requests_for(detectors: Iterable[Detector], *, fit: bool = False) -> list[Request]:
    """The union (in order, without duplicates) of the signals the detectors read to ``fit`` (``fit=True``)
    or to ``score``."""
    detectors = list(detectors)
    wanted: dict[str, Request] = {}
    for d in detectors:
        if not isinstance(d, Detector):
            raise InputError(f"expected gradood detectors (gradood.create(name)), got {type(d).__name__}.")
        try:
            requests = d.fit_requests() if fit else d.requests()
        except AttributeError as e:  # scoring signals that depend on fitted state (eps_, basis, ...)
            raise NotFittedError(
                f"{d.label} can only say which signals it scores after fit(): fit it first "
                f"(gradood.signals_for(probe, train_data, detectors, fit=True), then .fit), then request the "
                f"signals to score."
            ) from e
        for r in requests:
            wanted.setdefault(r.key, r)
    return list(wanted.values())


def require_for(signals: Signals, detectors: Iterable[Detector], *, fit: bool = False) -> Signals:
    """Compute, in one pass over ``signals``' data, every signal the detectors read (to fit if ``fit``, else to
    score) that is not there yet. Returns ``signals``."""
    if not isinstance(signals, Signals):
        raise InputError(f"signals must be gradood Signals (probe.signals(data)), got {type(signals).__name__}.")
    requests = requests_for(detectors, fit=fit)
    log.info("%s: one pass for %s (%s)", signals.name, ", ".join(r.key for r in requests) or "nothing",
             "to fit" if fit else "to score")
    signals.require(requests)
    return signals


def signals_for(probe: Any, data: Any, detectors: Iterable[Detector], *, fit: bool = False,
                **signals_options: Any) -> Signals:
    """``probe.signals(data, **signals_options)`` with everything the detectors need computed in one pass.

    ``fit=True`` for the data the detectors are fitted on (their ``fit_requests``), ``False`` for data to
    score (their ``requests``; the detectors must be fitted if what they score depends on it).
    ``signals_options``: ``name``, ``batch_size``, ``cache_dir``, ``progress``, ... of :meth:`Probe.signals`.
    """
    return require_for(probe.signals(data, **signals_options), detectors, fit=fit)
