"""The low-dimensional gradients' subspace fit on a local 2-CPU Ray cluster: each pass's partial sums computed by
model-holding actors and merged in data order equal the single-process streamed fit exactly and the in-memory fit
to float64 round-off, whatever the number of workers; scoring runs per batch on the cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradood
from gradood import stream

ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra: pip install 'gradood[ray]'")

import conftest  # noqa: E402
from conftest import MLP, make_inputs, make_labels, seeded  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def cluster():
    from gradood import distributed

    ray.cloudpickle.register_pickle_by_value(conftest)  # the test models live in conftest
    distributed.init(None, num_cpus=2)
    yield
    ray.shutdown()


def _flat(det):
    return torch.cat([v.double().reshape(-1, v.shape[-1]) for v in det.basis_.basis.directions.values()])


def test_lowdim_fit_on_ray_equals_the_streamed_and_in_memory_fits(tmp_path):
    from gradood import distributed

    model = seeded(MLP, 3, torch.float64, d_in=6, hidden=12, n_classes=5, logit_scale=2.0)
    x, y = make_inputs(90, 6, seed=8, dtype=torch.float64), make_labels(90, 5, seed=9)
    x_test = torch.cat([make_inputs(20, 6, seed=10, dtype=torch.float64),
                        make_inputs(10, 6, seed=11, dtype=torch.float64, scale=4.0)])
    kw = dict(k_dims=3, power_iters=2, probe_epochs=2, n_fit=70)
    probe = gradood.Probe(model)
    mem = gradood.create("lowdim-pca-energy", **kw).fit(probe.signals((x, y), batch_size=16, progress=False))
    local = stream.fit_from_data(gradood.create("lowdim-pca-energy", **kw), probe, (x, y), batch_size=16, splits=3,
                                 progress=False)
    # 3 blocks on 2 actors (one actor does two); one worker computes what the single-process stream does
    on_ray = distributed.fit_from_data(gradood.create("lowdim-pca-energy", **kw), gradood.Probe(model), (x, y),
                                       workers=2, batch_size=16, splits=3)
    # the same partial sums merged in the same order: identical to the single-process stream
    assert torch.equal(_flat(on_ray), _flat(local))
    np.testing.assert_allclose(_flat(on_ray), _flat(mem), rtol=0, atol=1e-12)
    np.testing.assert_allclose(_flat(on_ray), _flat(stream.fit_from_data(
        gradood.create("lowdim-pca-energy", **kw), probe, (x, y), batch_size=16, splits=1, progress=False)),
        rtol=0, atol=1e-12)
    # mahalanobis-ensemble: per-layer class moments per block on the actors (the LR on in-memory validation data)
    from conftest import SmallCNN

    cnn = seeded(SmallCNN, 1, torch.float64, logit_scale=3.0)
    xc, yc = make_inputs(96, 2, 5, 5, seed=3, dtype=torch.float64), make_labels(96, 4, seed=4)
    val = gradood.Probe(cnn).signals(make_inputs(30, 2, 5, 5, seed=7, dtype=torch.float64), batch_size=16,
                                     progress=False)
    ood = gradood.Probe(cnn).signals(make_inputs(30, 2, 5, 5, seed=5, dtype=torch.float64, scale=3.0),
                                     batch_size=16, progress=False)
    ens_ray = distributed.fit_from_data(gradood.create("mahalanobis-ensemble"), gradood.Probe(cnn), (xc, yc),
                                        workers=2, batch_size=16, splits=3, id_val=val, ood_val=ood)
    ens_local = stream.fit_from_data(gradood.create("mahalanobis-ensemble"), gradood.Probe(cnn), (xc, yc),
                                     batch_size=16, splits=3, id_val=val, ood_val=ood, progress=False)
    for g_ray, g_local in zip(ens_ray.gaussians_, ens_local.gaussians_):
        assert torch.equal(g_ray.means, g_local.means) and torch.equal(g_ray.precision, g_local.precision)
    np.testing.assert_array_equal(ens_ray.score(ood), ens_local.score(ood))

    shards = distributed.extract_to_shards(gradood.Probe(model), x_test, on_ray.requests(), tmp_path / "test",
                                           workers=2, batch_size=8, shard_rows=12)
    scores = distributed.score(on_ray, shards)
    np.testing.assert_allclose(scores, mem.score(probe.signals(x_test, batch_size=16, progress=False)),
                               rtol=1e-9, atol=1e-10)
