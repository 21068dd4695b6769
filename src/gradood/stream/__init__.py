"""Out of core: signals on disk in shards, detectors fitted and scored one shard at a time.

::

    from gradood import stream
    fit = stream.extract_to_shards(probe, train_loader, det.fit_requests(), "shards/train")
    stream.fit_streaming(det, fit)                       # mergeable statistics, shard by shard
    test = stream.extract_to_shards(probe, test_loader, det.requests(), "shards/test")
    scores = stream.score_streaming(det, test)           # only the score vector is whole in memory
    stream.fit_from_data(lowdim_det, probe, (x, y))      # fits that run the model each pass (lowdim's PCA)

Peak memory is one shard (``shard_rows`` rows of every signal), the fitted state and the score vector,
whatever the number of samples: ``benchmarks/bench_out_of_core.py`` measures it.
"""

from .fit import FITTERS, MODEL_FITS, StreamFit, fit_from_data, fit_streaming, score_streaming, streamable
from .shards import ShardedSignals, extract_to_shards

__all__ = ["ShardedSignals", "extract_to_shards", "fit_streaming", "fit_from_data", "score_streaming", "streamable",
           "StreamFit", "FITTERS", "MODEL_FITS"]
