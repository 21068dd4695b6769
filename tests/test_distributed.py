"""The Ray backend on a local 2-CPU cluster started by these tests: the same signals, fitted state, scores and
metrics as one process, whatever the number of workers, and no sample lost or repeated when an actor dies."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import gradood
from gradood import stream

ray = pytest.importorskip("ray", reason="the Ray backend is an optional extra: pip install 'gradood[ray]'")

import conftest  # noqa: E402
from conftest import SmallCNN, make_inputs, make_labels, seeded  # noqa: E402

pytestmark = pytest.mark.slow

N, C = 300, 4


@pytest.fixture(scope="module", autouse=True)
def cluster():
    from gradood import distributed

    # the test models live in conftest, which the workers cannot import: ship its classes by value
    ray.cloudpickle.register_pickle_by_value(conftest)
    distributed.init(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return seeded(SmallCNN, 1, dtype=torch.float64, logit_scale=3.0)


@pytest.fixture(scope="module")
def data():
    x = make_inputs(N, 2, 5, 5, seed=3, dtype=torch.float64)
    return x, make_labels(N, C, seed=4)


@pytest.fixture(scope="module")
def ood():
    return make_inputs(N // 2, 2, 5, 5, seed=5, dtype=torch.float64, scale=3.0)


def requests_of(*names: str) -> list:
    reqs = [gradood.LOGITS, gradood.FEATURES]
    for n in names:
        d = gradood.create(n)
        reqs += d.requests()
    return list(dict.fromkeys(reqs))


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_extraction_equals_one_process(model, data, workers):
    from gradood import distributed

    reqs = requests_of("grodin", "odin")  # per-sample full-network gradients and a perturbed-input signal
    got, labels = distributed.extract(gradood.Probe(model), data, reqs, workers=workers, batch_size=64)
    local = gradood.Probe(model).signals(data, batch_size=64, progress=False)
    local.require(reqs)
    assert torch.equal(labels, data[1])
    for r in reqs:
        torch.testing.assert_close(got[r.key], local.get(r), rtol=1e-12, atol=1e-12, msg=r.key)


def test_fit_from_shards_on_ray_equals_the_local_fit_and_metrics_agree(model, data, ood, tmp_path):
    from gradood import distributed

    names = ["mahalanobis", "vim", "react", "knn", "msp"]
    reqs = requests_of(*names)
    fit = distributed.extract_to_shards(gradood.Probe(model), data, reqs, tmp_path / "fit", workers=2,
                                        batch_size=50, shard_rows=100)
    test = distributed.extract_to_shards(gradood.Probe(model), data[0], reqs, tmp_path / "test", workers=2,
                                         batch_size=50, shard_rows=100)
    oods = distributed.extract_to_shards(gradood.Probe(model), ood, reqs, tmp_path / "ood", workers=1,
                                         batch_size=50, shard_rows=100)
    local_fit = gradood.Probe(model).signals(data, batch_size=50, progress=False)
    local_test = gradood.Probe(model).signals(data[0], batch_size=50, progress=False)
    local_ood = gradood.Probe(model).signals(ood, batch_size=50, progress=False)
    for name in names:
        params = {"k": 5} if name == "knn" else {"dim": 3} if name == "vim" else {}
        on_ray = distributed.fit(gradood.create(name, **params), fit)
        streamed = stream.fit_streaming(gradood.create(name, **params), fit)
        s_ray = (distributed.score(on_ray, test), distributed.score(on_ray, oods))
        s_stream = (stream.score_streaming(streamed, test), stream.score_streaming(streamed, oods))
        np.testing.assert_array_equal(s_ray[0], s_stream[0], err_msg=name)  # same per-shard stats, same order
        in_memory = gradood.create(name, **params).fit(local_fit)
        s_mem = (in_memory.score(local_test), in_memory.score(local_ood))
        np.testing.assert_allclose(s_ray[0], s_mem[0], rtol=1e-6, err_msg=name)
        m_ray, m_mem = gradood.evaluate(*s_ray), gradood.evaluate(*s_mem)
        for key in ("auroc", "fpr95"):
            assert abs(m_ray[key] - m_mem[key]) <= 1e-9, (name, key)


def test_a_killed_actor_is_retried_without_lost_or_repeated_samples(model, data, tmp_path):
    from dataclasses import dataclass

    from gradood import distributed
    from gradood.signals import Request

    marker = str(tmp_path / "died-once")

    @dataclass(frozen=True)
    class DieOnce(Request):
        """Kills its worker process the first time it runs anywhere (a marker file says it did)."""

        marker: str

        @property
        def key(self) -> str:
            return "die-once"

        def compute(self, batch):
            if batch.index == 2 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)  # a hard crash: no exception, no cleanup
            return batch.logits[:, :1]

    reqs = [gradood.LOGITS, DieOnce(marker)]
    got, labels = distributed.extract(gradood.Probe(model), data, reqs, workers=2, batch_size=32)
    assert os.path.exists(marker), "the actor did die"
    local = gradood.Probe(model).signals(data, batch_size=32, progress=False)
    assert torch.equal(got["logits"], local.logits)
    assert torch.equal(got["die-once"], local.logits[:, :1])
    assert torch.equal(labels, data[1])


def test_bench_with_ray_gives_the_single_process_metrics(tmp_path):
    from gradood.bench.runner import run_benchmark
    from gradood.bench.spec import parse_spec
    from gradood.distributed import RayExecutor

    spec = parse_spec("""
name = "ray"
batch_size = 100
ood_val = 50
detectors = ["msp", "mahalanobis", "knn", "odin", "grodin"]
[[run]]
model = "lenet-fmnist"
id_fit = { dataset = "fashion_mnist", split = "train", stop = 50000, n = 300 }
id_test = { dataset = "fashion_mnist", split = "test", n = 200 }
ood = [{ dataset = "mnist", split = "test", n = 200, group = "near" }]
""", "ray.toml")
    plain, _, errors = run_benchmark(spec, tmp_path / "plain", progress=False, log=lambda m: None)
    assert not errors
    on_ray, _, errors = run_benchmark(spec, tmp_path / "ray", progress=False, log=lambda m: None,
                                      executor=RayExecutor(workers=2))
    assert not errors
    key = lambda r: (r["detector"], r["ood_set"])  # noqa: E731
    assert sorted(map(key, plain)) == sorted(map(key, on_ray))
    ray_rows = {key(r): r for r in on_ray}
    for r in plain:
        for m in ("auroc", "fpr95"):
            assert abs(r[m] - ray_rows[key(r)][m]) <= 1e-9, (key(r), m)
