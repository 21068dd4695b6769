"""The classifier head is found by data flow: the nn.Linear / 1x1 conv whose output becomes the model's logits.

Every model here calls another linear layer *after* its head (or has no nn.Linear head at all), so taking
"the last nn.Linear reached" -- the rule before -- picks the wrong layer; ambiguous and unreachable heads
are errors that name the candidates and ``head=``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradood
from conftest import ConvHeadNet, make_inputs, seeded


def _signals(model, x, **kw):
    probe = gradood.Probe(model, **kw)
    return probe, probe.signals(x, batch_size=4, progress=False)


class AuxAfterHead(nn.Module):
    """``fc`` outputs the logits; ``aux`` (3 outputs, e.g. a rotation-prediction branch) is called afterwards.

    ``returns`` picks the output format: the logits, ``(logits, aux)``, or ``{"logits", "aux"}``."""

    def __init__(self, returns: str = "logits") -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.fc = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 3)
        self.returns = returns

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        h = self.body(x)
        z = self.fc(h)
        a = self.aux(h)
        if self.returns == "tuple":
            return z, a
        if self.returns == "dict":
            return {"aux": a, "logits": z}
        return z


@pytest.mark.parametrize("returns", ["logits", "tuple", "dict"])
def test_auxiliary_linear_called_after_the_head_is_not_the_head(returns):
    model, x = seeded(AuxAfterHead, 0, returns=returns), make_inputs(9, 6, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head's output are the model's logits: nothing to warn about
        probe, s = _signals(model, x)
        logits = s.logits
    assert probe.head_name == "fc"
    with torch.no_grad():
        torch.testing.assert_close(logits, model.fc(model.features(x)))
        torch.testing.assert_close(s.features, model.features(x))
    assert logits.shape == (9, 5)


class ScaledReshaped(nn.Module):
    """The head's output is reshaped, scaled by a learned temperature, dropped out (identity in eval mode) and
    flattened before it is returned; a projection layer runs after the head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.cls = nn.Linear(8, 4)
        self.drop = nn.Dropout(0.3)
        self.temperature = nn.Parameter(torch.tensor(2.0))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.body(x)
        z = self.cls(h).reshape(-1, 1, 4).transpose(1, 2)  # B x 4 x 1
        _ = self.proj(h)  # e.g. an embedding for a contrastive loss
        z = self.drop(z / self.temperature + 0.5)
        z += 0.25  # in place, after the head
        return z.flatten(1)


def test_head_output_scaled_and_reshaped_is_found():
    model, x = seeded(ScaledReshaped, 0), make_inputs(7, 6, seed=2)
    probe, s = _signals(model, x)
    with pytest.warns(UserWarning, match="differs from the output of its head 'cls'"):
        logits = s.logits  # the model rescales its logits: gradood says it uses the head's output
    assert probe.head_name == "cls"
    with torch.no_grad():
        torch.testing.assert_close(logits, model.cls(model.body(x)))


class SeqHeads(nn.Module):
    """``head = Sequential(Linear, Dropout)``; a ``projection = Sequential(Linear, ReLU, Linear)`` after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
        self.head = nn.Sequential(nn.Linear(8, 5), nn.Dropout(0.5))
        self.projection = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        h = self.body(x)
        logits = self.head(h)
        self.embedding = self.projection(h)
        return logits


def test_sequential_head_is_found_before_a_sequential_projection():
    model, x = seeded(SeqHeads, 0), make_inputs(6, 6, seed=3)
    probe, s = _signals(model, x)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model(x))
        torch.testing.assert_close(s.features, model.body(x))
    assert probe.head_name == "head.0"


def test_1x1_conv_head_is_found_without_a_name():
    """BiT-style: a 1x1 conv on pooled maps is the head; no nn.Linear in the model at all."""
    model, x = seeded(ConvHeadNet, 0), make_inputs(6, 2, 5, 5, seed=4)
    probe, s = _signals(model, x)
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model(x))
        torch.testing.assert_close(s.features, model.features(x))
    assert probe.head_name == "cls"


class ConvBodyWith1x1(nn.Module):
    """1x1 convs inside the body (bottleneck / shortcut) followed by a linear head and an auxiliary linear."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(2, 4, 1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        a = torch.relu(self.reduce(x))
        h = torch.relu(self.conv(a) + self.shortcut(a)).mean(dim=(2, 3))
        z = self.fc(h)
        self.aux(h)
        return z


def test_body_1x1_convs_are_not_heads():
    model, x = seeded(ConvBodyWith1x1, 0), make_inputs(5, 2, 4, 4, seed=5)
    probe, s = _signals(model, x)
    s.logits
    assert probe.head_name == "fc"


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return 0.5 * (self.head_a(h) + self.head_b(h))


def test_ambiguous_heads_are_an_error_naming_them():
    probe, s = _signals(seeded(TwoHeads, 0), make_inputs(4, 6))
    with pytest.raises(gradood.ModelError) as e:
        s.logits
    msg = str(e.value)
    assert "ambiguous" in msg and "'head_a'" in msg and "'head_b'" in msg and "head=" in msg
    # naming one of them is honoured
    probe, s = _signals(seeded(TwoHeads, 0), make_inputs(4, 6), head="head_a")
    with pytest.warns(UserWarning, match="differs from the output of its head 'head_a'"):
        s.logits


class FunctionalHead(nn.Module):
    """The logits come from a matrix multiply with a bare parameter, not from a module."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        return torch.relu(self.body(x)) @ self.w.T


def test_no_layer_reaching_the_logits_is_an_error_naming_the_candidates():
    probe, s = _signals(seeded(FunctionalHead, 0), make_inputs(4, 6))
    with pytest.raises(gradood.ModelError) as e:
        s.logits
    msg = str(e.value)
    assert "['body']" in msg and "head=" in msg and "'Mm'" in msg  # where the data flow stopped


class ClassificationHead(nn.Module):
    """RoBERTa's head: dense -> tanh -> out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 4)

    def forward(self, h):
        return self.out_proj(torch.tanh(self.dense(h)))


class RobertaLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.classifier = ClassificationHead()

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


def test_head_named_as_a_container_resolves_to_the_layer_inside_it_that_outputs_the_logits():
    model, x = seeded(RobertaLike, 0), make_inputs(5, 6, seed=6)
    probe, s = _signals(model, x, head="classifier")
    with torch.no_grad():
        torch.testing.assert_close(s.logits, model(x))
        torch.testing.assert_close(s.features, torch.tanh(model.classifier.dense(torch.relu(model.body(x)))))
    assert probe.head_name == "classifier.out_proj"


class LastTokenScore(nn.Module):
    """GPT-2-like: ``score`` applied at every position, the logits read at each row's last non-pad token."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.score = nn.Linear(8, 3, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids))).cumsum(dim=1)  # causal-like: position t sees <= t

    def forward(self, ids):
        per_position = self.score(self.hidden(ids))
        last = (ids != 0).sum(dim=1) - 1
        return per_position[torch.arange(ids.shape[0]), last]


def test_head_applied_at_every_position_is_read_where_the_model_pools():
    model = seeded(LastTokenScore, 0)
    ids = torch.randint(1, 20, (6, 7), generator=torch.Generator().manual_seed(0))
    ids[2:, 4:] = 0  # right padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe, s = _signals(model, ids)
        logits, feats = s.logits, s.features
    last = (ids != 0).sum(dim=1) - 1
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids))
        torch.testing.assert_close(feats, model.hidden(ids)[torch.arange(6), last])
    assert probe.head_name == "score"


def test_head_at_every_position_with_averaged_logits_is_refused():
    class MeanPooled(LastTokenScore):
        def forward(self, ids):
            return self.score(self.hidden(ids)).mean(dim=1)

    probe, s = _signals(seeded(MeanPooled, 0), torch.randint(1, 20, (4, 5)), head="score")
    with pytest.raises(gradood.ModelError, match=r"not its output at any one position"):
        s.logits


def test_head_is_found_under_inference_mode():
    """Head discovery follows autograd: it still works when the user runs gradood under inference_mode."""
    model, x = seeded(AuxAfterHead, 0), make_inputs(5, 6, seed=7)
    with torch.inference_mode():
        probe, s = _signals(model, x)
        logits = s.logits
    assert probe.head_name == "fc"
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def test_logits_without_autograd_graph_ask_for_head():
    class Detaching(AuxAfterHead):
        def forward(self, x):
            return super().forward(x).detach()

    probe, s = _signals(seeded(Detaching, 0), make_inputs(4, 6))
    with pytest.raises(gradood.ModelError, match=r"no autograd graph.*\['body.0', 'fc', 'aux'\].*head="):
        s.logits
