"""The probe: turns any trained PyTorch classifier into the signals detectors need.

A :class:`Probe` wraps an ``nn.Module`` classifier. It finds the classifier head by data flow -- the
``nn.Linear`` (or 1x1 ``nn.Conv2d`` on 1x1 maps, as in BiT) whose output becomes the model's logits, through
reshapes and element-wise ops only (see :mod:`gradood._head`) -- or takes its name, and runs batches in eval
mode, capturing with hooks:

* ``logits``: the head's output, ``B x C`` (the closed forms of gradood's gradient scores are exact for it);
* ``features``: the head's input, the penultimate features ``h``, ``B x D``;
* named layer activations ("taps"), e.g. for FSSD or multi-layer Mahalanobis.

Inputs are a tensor (``model(x)``) or a dict of tensors such as a tokenizer's output (``model(**x)``); the
model may return a tensor, a tuple (logits first), a dict with ``"logits"`` or a transformers
``ModelOutput`` (``.logits``), or anything a user ``logits=`` callable reads. A head applied at every
position (GPT-2's ``score``) is read at the position whose output the model returns as its logits.

Every batch is checked: finite inputs, the same per-sample shape as the first batch (for dict inputs: the
same keys; sequence lengths may vary), finite logits.
``probe.signals(data)`` gives a lazy :class:`~gradood.signals.Signals` over a DataLoader / tensors that
computes whatever the detectors ask for in one streaming pass, holding one batch of intermediates.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._batches import Inputs, as_inputs, check_equal_lengths, take_rows
from ._head import find_head, is_head_candidate, pool_positions
from .errors import GradoodError, InputError, ModelError

if TYPE_CHECKING:  # annotations only (signals imports probe)
    from .signals import Signals


#: :meth:`Probe.perturbation_target` for inputs perturbed through their token embeddings
EMBEDDINGS = "<token embeddings>"


@dataclass
class ShiftedTokens:
    """Token inputs whose token embeddings are moved by ``delta``: what perturbation methods (ODIN, GRODIN
    eps > 0, Mahalanobis and FSSD preprocessing) run the model on when the inputs are integer ids.

    ``delta`` has the shape of the token-embedding layer's output (``B x L x H``) and is in the units of the
    embedding table (added to each coordinate of every token's embedding, before position embeddings and
    LayerNorm); the token ids, attention mask and everything else are unchanged, so padding and pooling at
    the last non-pad token behave as on the clean inputs.
    """

    inputs: Inputs
    delta: torch.Tensor


@dataclass
class ForwardOutput:
    """What one forward pass of a batch yields."""

    logits: torch.Tensor
    features: torch.Tensor
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    x: "Inputs | ShiftedTokens | None" = None  # the validated input batch, on the model's device
    output: Any = None  # what the model returned (tensor, tuple, dict, ModelOutput)


def _all_finite(t: torch.Tensor) -> bool:
    """True iff every value is finite. The sum is finite iff all values are, unless finite values overflow it;
    only then (or on a real NaN/Inf) is the exact element-wise test run, so the happy path costs one sum."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _float_parts(x: Inputs) -> list[torch.Tensor]:
    """The floating-point tensors of a batch of inputs (token ids and masks are not checked for NaN)."""
    parts = list(x.values()) if isinstance(x, dict) else [x]
    return [t for t in parts if t.is_floating_point()]


def _tap_copy(name: str, o: Any) -> torch.Tensor:
    if not isinstance(o, torch.Tensor):
        raise ModelError(f"layer {name!r} outputs a {type(o).__name__}, not a tensor, so it cannot be tapped; "
                         "name a layer inside it that outputs a tensor.")
    return o.clone()


def _modified_output(name: str, out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(out)`` for ``Probe.forward(modify=...)``: a tensor of the same shape, or an error naming the layer."""
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"modify: layer {name!r} outputs a {type(out).__name__}, not a tensor; name a layer "
                         "inside it that outputs a tensor.")
    new = fn(out)
    if not isinstance(new, torch.Tensor) or new.shape != out.shape:
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        raise ModelError(f"modify: the function for layer {name!r} must return a tensor of the layer's output "
                         f"shape {tuple(out.shape)}, got {got}.")
    return new.to(out.dtype)


def call_model(model: nn.Module, x: Inputs) -> Any:
    """``model(**x)`` for dict inputs (HuggingFace convention), ``model(x)`` otherwise."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def output_logits(out: Any, logits: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The logits in a model's output: ``logits(out)`` when given, else the output itself if a tensor, its
    ``.logits`` (transformers ``ModelOutput``), its ``["logits"]`` (dict) or its first element (tuple)."""
    if logits is not None:
        z = logits(out)
        if not isinstance(z, torch.Tensor):
            raise ModelError(f"the logits= callable returned a {type(z).__name__}, not a tensor.")
        return z
    if isinstance(out, torch.Tensor):
        return out
    z = getattr(out, "logits", None)
    if isinstance(z, torch.Tensor):
        return z
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        raise ModelError(
            f"the model returned a {type(out).__name__} without a 'logits' tensor (keys {list(out)[:8]}). Pass "
            "Probe(model, logits=lambda out: out['<key>']) to say where the logits are."
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelError(
        f"cannot find the logits in the model's output of type {type(out).__name__}: gradood reads a tensor, "
        "its .logits, ['logits'] or [0]. Pass Probe(model, logits=<callable mapping the output to B x C logits>)."
    )


class Probe:
    """Wrap a trained classifier so that detectors can read its logits, features and layer activations.

    Parameters
    ----------
    model:
        Any ``nn.Module`` mapping a batch of inputs to ``B x C`` logits. It is run in eval mode (its previous
        train/eval flags are restored after each pass) on the device of its parameters.
    head:
        Name (as in ``model.named_modules()``) of the classifier head: an ``nn.Linear``, or an ``nn.Conv2d``
        with a 1x1 kernel applied to 1x1 maps. ``None`` (default): the last ``nn.Linear`` reached in the
        forward pass, found on the first batch.
    input_std:
        Per-channel standard deviation of the input normalisation (a float or a sequence, one per channel).
        Perturbation methods (ODIN, GRODIN, FSSD, Mahalanobis) divide their input step by it so that their
        epsilon is in [0, 1]-pixel units, as the ODIN code does. ``None`` means inputs are not normalised.
    input_mean:
        Per-channel mean of the input normalisation (used with ``input_std`` to map [0, 1] pixels, e.g.
        FSSD's uniform noise, into the model's input space). ``None`` means 0.
    logits:
        A callable mapping the model's output to its ``B x C`` logits, for outputs gradood cannot read by
        itself. ``None`` (default): the output itself if a tensor, else its ``.logits`` (transformers
        ``ModelOutput``), ``["logits"]`` (dict) or ``[0]`` (tuple).
    embeddings:
        Name of the token-embedding module whose output perturbation methods move for token inputs (integer
        ids): they add ``eps * sign(grad)`` to every coordinate of its output, so for text ``eps`` is in the
        units of the embedding table (``input_std`` does not apply). ``None`` (default):
        ``model.get_input_embeddings()`` for transformers models, else the model's only ``nn.Embedding``.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | None = None,
        *,
        input_std: float | Sequence[float] | None = None,
        input_mean: float | Sequence[float] | None = None,
        logits: Callable[[Any], torch.Tensor] | None = None,
        embeddings: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"Probe needs a torch.nn.Module, got {type(model).__name__}.")
        if logits is not None and not callable(logits):
            raise ModelError(f"logits= must be a callable mapping the model's output to its logits, got {logits!r}.")
        self.model = model
        self.logits_fn = logits
        self._modules = dict(model.named_modules())
        self.head_name: str | None = None
        self.requested_head = head  # part of the signal cache's key (gradood.cache): "auto" when None
        self._head_scope: str | None = None
        if head is not None:
            self._set_head(head)
        if embeddings is not None and embeddings not in self._modules:
            raise ModelError(f"the model has no module named {embeddings!r} (embeddings=); name its token "
                             "embedding layer as in model.named_modules().")
        self.embeddings_name = embeddings
        self.input_std = input_std
        self.input_mean = input_mean
        self._input_shape: Any = None
        self._input_keys: tuple[str, ...] | None = None
        self._example: Inputs | None = None
        self._checked_output = False

    # ------------------------------------------------------------------ head
    def _set_head(self, name: str) -> None:
        if name not in self._modules:
            linear = [n for n, m in self._modules.items() if isinstance(m, nn.Linear)]
            raise ModelError(
                f"the model has no module named {name!r}; its nn.Linear modules are {linear or 'none'}. "
                "Pass head=<name of the layer that outputs the logits>."
            )
        m = self._modules[name]
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            # A container (nn.Sequential, RoBERTa's classification head...): the candidate layer inside it.
            inner = [f"{name}.{n}" if n else name for n, sub in m.named_modules() if n and is_head_candidate(sub)]
            if not inner and isinstance(m, nn.Sequential):
                raise ModelError(f"{name!r} is a Sequential without an nn.Linear; name the linear layer itself.")
            if len(inner) > 1:
                self._head_scope = name  # which one outputs the logits is found by data flow on the first batch
                return
            if inner:
                name, m = inner[0], self._modules[inner[0]]
        if isinstance(m, nn.Conv2d):
            if m.kernel_size != (1, 1) or m.groups != 1:
                raise ModelError(f"head {name!r} is a Conv2d with kernel {m.kernel_size}; only 1x1 convs act as heads.")
        elif not isinstance(m, nn.Linear):
            raise ModelError(
                f"head {name!r} is a {type(m).__name__}; the head must be the nn.Linear (or 1x1 Conv2d) "
                "whose output are the logits."
            )
        self.head_name = name

    @property
    def head(self) -> nn.Module:
        if self.head_name is None:
            raise ModelError("the head is not known yet: run a batch through the probe or pass head=<name>.")
        return self._modules[self.head_name]

    @property
    def weight(self) -> torch.Tensor:
        """Head weight as ``C x D`` (detached)."""
        w = self.head.weight.detach()
        return w.reshape(w.shape[0], -1)

    @property
    def bias(self) -> torch.Tensor | None:
        """Head bias ``C`` (detached), or None."""
        b = self.head.bias
        return None if b is None else b.detach()

    def _find_head(self, x: Inputs) -> None:
        """The head by data flow (see :mod:`gradood._head`), on the first two samples of the first batch."""
        def run() -> Any:
            # autograd must record even when called under torch.inference_mode (inputs made there are cloned)
            with torch.inference_mode(False), self.eval_mode():
                few = take_rows(x, slice(0, 2))
                few = {k: v.clone() for k, v in few.items()} if isinstance(few, dict) else few.clone()
                return self._run_model(few)  # a model failing on the first batch gets the InputError below

        self._set_head(find_head(self.model, run, self.output_logits, scope=self._head_scope))
        self._head_scope = None

    def output_logits(self, out: Any) -> torch.Tensor:
        """The logits in an output of the model (see :func:`output_logits` and ``logits=``)."""
        return output_logits(out, self.logits_fn)

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Run the model in eval mode and restore the flags of the modules that were training afterwards
        (nothing to do, and nothing touched, when the model is already in eval mode: the common case)."""
        training = [m for m in self._modules.values() if m.training]
        if not training:
            yield
            return
        self.model.eval()
        try:
            yield
        finally:
            for m in training:
                m.training = True

    def prepare(self, x: Inputs, *, batch_index: int | None = None, check_finite: bool = True) -> Inputs:
        """Validate a batch of inputs and move it to the model's device and dtype (``check_finite=False``
        leaves the NaN/Inf test to the caller, e.g. :meth:`forward`, which folds it into its logits check).
        Dict inputs (a tokenizer's output) keep their integer entries' dtype."""
        where = "" if batch_index is None else f" in batch {batch_index}"
        if isinstance(x, Mapping):
            return self._prepare_dict(x, where, check_finite)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"inputs{where} must be a tensor, got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[0] == 0:
            raise InputError(f"empty batch{where} (shape {tuple(x.shape)}): the dataset yields no samples.")
        if check_finite and x.is_floating_point() and not _all_finite(x):
            self._raise_nonfinite_inputs(x, where)
        shape = tuple(x.shape[1:])
        if self._input_shape is not None and shape != self._input_shape:
            raise InputError(
                f"inputs{where} have per-sample shape {shape}, but earlier batches had {self._input_shape}. "
                "All data scored with one model must share the input shape the model expects: resize or "
                "reshape them in the dataset transform."
            )
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def _prepare_dict(self, x: Mapping[str, Any], where: str, check_finite: bool) -> dict[str, torch.Tensor]:
        x = as_inputs(x, f"inputs{where}")
        n = check_equal_lengths(x, f"inputs{where}")  # type: ignore[arg-type]
        if n == 0:
            raise InputError(f"empty batch{where}: the dataset yields no samples.")
        keys = tuple(x)
        if self._input_keys is not None and set(keys) != set(self._input_keys):
            raise InputError(
                f"inputs{where} have the keys {sorted(keys)}, but earlier batches had {sorted(self._input_keys)}. "
                "Every batch must pass the model the same keyword arguments."
            )
        if isinstance(self._input_shape, dict):
            for k, v in x.items():  # type: ignore[union-attr]
                first = self._input_shape[k]
                # sequence lengths may vary between batches (dynamic padding); the rank and float shapes may not
                if v.ndim - 1 != len(first) or (v.is_floating_point() and tuple(v.shape[1:]) != first):
                    raise InputError(
                        f"input {k!r}{where} has per-sample shape {tuple(v.shape[1:])}, but earlier batches had "
                        f"{first}. Resize or reshape them in the dataset transform."
                    )
        out: dict[str, torch.Tensor] = {}
        for k, v in x.items():  # type: ignore[union-attr]
            v = v.to(self.device, non_blocking=True)
            out[k] = v.to(self.dtype) if v.is_floating_point() and v.dtype != self.dtype else v
        if check_finite and not all(_all_finite(t) for t in _float_parts(out)):
            self._raise_nonfinite_inputs(out, where)
        return out

    @staticmethod
    def _raise_nonfinite_inputs(x: Inputs, where: str) -> None:
        for key, t in (x.items() if isinstance(x, dict) else [(None, x)]):
            if not t.is_floating_point():
                continue
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                idx = bad.nonzero().flatten()[:5].tolist()
                what = "inputs" if key is None else f"input {key!r}"
                raise InputError(
                    f"{what}{where} contain NaN or Inf (samples {idx} of the batch). Clean or drop those "
                    "samples before scoring (e.g. torch.nan_to_num, or check the loading/normalisation code)."
                )

    def _run_model(self, x: Inputs) -> Any:
        try:
            return call_model(self.model, x)
        except GradoodError:
            raise  # gradood's own hooks already said what is wrong
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if self._input_shape is None:
                what = (f"the keyword inputs {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in x.items())}}}"
                        if isinstance(x, dict) else f"inputs of per-sample shape {tuple(x.shape[1:])}")
                how = (" A dict batch is passed to the model as keyword arguments (model(**batch)); a dict with an "
                       "'x'/'input'/'image' entry is read as that one input tensor." if isinstance(x, dict) else "")
                raise InputError(
                    f"the model failed on {what} ({type(e).__name__}: {e}). Check that the data has the shape, "
                    f"channel order, keys and dtype the model expects.{how}"
                ) from e
            raise

    def forward(self, x: "Inputs | ShiftedTokens", taps: Sequence[str] = (), *, grad: bool = False,
                batch_index: int | None = None, validate: bool = True,
                modify: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> ForwardOutput:
        """Run one batch and return logits (head output), features (head input) and the named taps.

        With ``grad=False`` (default) runs under ``torch.no_grad``; with ``grad=True`` the outputs stay in the
        autograd graph (for input gradients and per-sample parameter gradients).

        ``modify`` maps module names to functions of their output: each named layer's output is replaced by
        ``fn(output)`` (same shape) and the network runs on from there, so that a method can reshape a feature
        map in the middle of the network (ASH, RankFeat, ...). Taps of a modified layer see the modified output.
        """
        if validate:
            if isinstance(x, ShiftedTokens):
                raise InputError("shifted token inputs are made by gradood's perturbation code and are not "
                                 "validated again; pass the token inputs themselves.")
            x = self.prepare(x, batch_index=batch_index, check_finite=False)
        if self.head_name is None:
            self._find_head(x.inputs if isinstance(x, ShiftedTokens) else x)
        captured: dict[str, Any] = {}
        head = self.head

        def head_hook(_m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured["features"] = inputs[0]
            captured["logits"] = output

        handles = [head.register_forward_hook(head_hook)]
        for name, fn in (modify or {}).items():
            if name not in self._modules:
                raise InputError(f"modify: unknown layer {name!r}: name modules of the model, e.g. "
                                 f"{[n for n in self._modules if n][:8]}...")
            handles.append(self._modules[name].register_forward_hook(
                lambda _m, _i, o, n=name, f=fn: _modified_output(n, o, f)))
        for t in taps:
            if t in ("logits", "features"):
                continue
            if t not in self._modules:
                raise InputError(
                    f"unknown layer {t!r}: taps must name modules of the model, e.g. "
                    f"{[n for n in self._modules if n][:8]}..."
                )
            # a clone (differentiable, so also with grad=True): a later in-place op (x += identity,
            # ReLU(inplace)) must not change what was captured
            handles.append(self._modules[t].register_forward_hook(
                lambda _m, _i, o, n=t: captured.__setitem__(("tap", n), _tap_copy(n, o))))
        try:
            with self.eval_mode(), torch.set_grad_enabled(grad), self.model_inputs(x) as inputs:
                out = self._run_model(inputs)
        finally:
            for h in handles:
                h.remove()
        if "logits" not in captured:
            raise ModelError(f"the head {self.head_name!r} was not reached in the forward pass of this batch.")
        logits, feats = captured["logits"], captured["features"]
        if isinstance(head, nn.Conv2d):
            if logits.shape[-2:] != (1, 1):
                raise ModelError(f"head {self.head_name!r} is a 1x1 conv applied to {tuple(logits.shape[-2:])} maps; "
                                 "gradood needs pooled 1x1 maps at the head.")
            logits, feats = logits.flatten(1), feats.flatten(1)
        elif logits.ndim > 2:
            # a head applied at every position (GPT-2's score): read it where the model reads its logits
            logits, feats = pool_positions(logits, feats, self._sequence_logits(out, logits), self.head_name)
        if feats.ndim != 2:
            raise ModelError(
                f"the head {self.head_name!r} receives inputs of shape {tuple(feats.shape)}; gradood needs one "
                "feature vector per sample (B x D). Name a head that follows pooling/flattening."
            )
        if validate:
            # One synchronising test for inputs and logits together; the exact checks only when it fails.
            floats = _float_parts(x)
            finite = bool(torch.isfinite(logits.detach().sum() + sum((t.sum() for t in floats), 0.0)))
            if not finite and not all(_all_finite(t) for t in floats):
                self._raise_nonfinite_inputs(x, "" if batch_index is None else f" in batch {batch_index}")
            self._check_logits(logits, out, batch_index, known_finite=finite)
            if self._input_shape is None:
                if isinstance(x, dict):
                    self._input_shape = {k: tuple(v.shape[1:]) for k, v in x.items()}
                    self._input_keys = tuple(x)
                    self._example = {k: v[:1].detach().clone() for k, v in x.items()}
                else:
                    self._input_shape = tuple(x.shape[1:])
                    self._example = x[:1].detach().clone()
        taps_out = {t: captured[("tap", t)] for t in taps if ("tap", t) in captured}
        for t in taps:
            if t == "logits":
                taps_out[t] = logits
            elif t == "features":
                taps_out[t] = feats
            elif t not in taps_out:
                raise ModelError(f"layer {t!r} was not reached in the forward pass.")
        return ForwardOutput(logits=logits, features=feats, taps=taps_out, x=x, output=out)

    def _sequence_logits(self, out: Any, head_out: torch.Tensor) -> torch.Tensor:
        try:
            z = self.output_logits(out)
        except ModelError as e:
            raise ModelError(f"the head {self.head_name!r} is applied at every position and {e}") from None
        if z.ndim != 2 or z.shape[0] != head_out.shape[0] or z.shape[1] != head_out.shape[-1]:
            raise ModelError(
                f"the head {self.head_name!r} outputs {tuple(head_out.shape)} (one output per position) and the "
                f"model's logits have shape {tuple(z.shape)}, not B x C = ({head_out.shape[0]}, "
                f"{head_out.shape[-1]}). Name a head applied after the pooling (head=), or pass logits=."
            )
        return z

    def _check_logits(self, logits: torch.Tensor, out: Any, batch_index: int | None,
                      known_finite: bool = False) -> None:
        where = "" if batch_index is None else f" in batch {batch_index}"
        if known_finite or _all_finite(logits.detach()):
            bad = None
        else:
            bad = ~torch.isfinite(logits.detach()).all(dim=1)
        if bad is not None:
            idx = bad.nonzero().flatten()[:5].tolist()
            raise InputError(
                f"the model produced NaN/Inf logits{where} (samples {idx} of the batch). Check the inputs' "
                "scale and normalisation, and that the weights loaded correctly."
            )
        if not self._checked_output:
            self._checked_output = True
            try:
                z = self.output_logits(out)
            except ModelError as e:
                warnings.warn(f"{e} gradood uses the output of the head {self.head_name!r} as the logits.",
                              stacklevel=3)
                return
            if not (z.shape == logits.shape
                    and torch.allclose(z.detach().to(logits.dtype), logits.detach(), rtol=1e-4, atol=1e-5)):
                warnings.warn(
                    f"the model's output differs from the output of its head {self.head_name!r}; gradood uses "
                    "the head's output as the logits (the closed-form gradient scores are exact for it). "
                    "If another layer outputs the logits, pass head=<its name>.",
                    stacklevel=3,
                )

    # ------------------------------------------------------------------ token embeddings
    def perturbation_target(self, x: "Inputs | ShiftedTokens") -> str | None:
        """What input perturbation moves for these inputs: ``None`` (the input tensor itself), the key of a
        dict entry (``inputs_embeds``, ``pixel_values``, or the only floating entry that is not a mask), or
        :data:`EMBEDDINGS` for integer token ids (the token-embedding layer's output, see :class:`ShiftedTokens`).
        """
        if isinstance(x, ShiftedTokens):
            return EMBEDDINGS
        if isinstance(x, torch.Tensor):
            return None if x.is_floating_point() else EMBEDDINGS
        for k in ("inputs_embeds", "pixel_values", "input_values", "input_features"):
            if k in x and x[k].is_floating_point():
                return k
        if "input_ids" in x or any(not v.is_floating_point() and "mask" not in k and "type" not in k
                                   for k, v in x.items()):
            return EMBEDDINGS
        floats = [k for k, v in x.items() if v.is_floating_point() and "mask" not in k]
        if len(floats) == 1:
            return floats[0]
        raise InputError(
            f"cannot tell which of the inputs {sorted(x)} to perturb: gradood perturbs 'inputs_embeds', "
            "'pixel_values', the token embeddings of 'input_ids', or the only floating-point entry."
        )

    def embedding_layer(self) -> tuple[str, nn.Module]:
        """``(name, module)`` of the token-embedding layer that perturbation moves for token inputs."""
        if self.embeddings_name is not None:
            return self.embeddings_name, self._modules[self.embeddings_name]
        get = getattr(self.model, "get_input_embeddings", None)
        if callable(get):
            try:
                m = get()
            except (NotImplementedError, AttributeError):
                m = None
            names = [n for n, mm in self._modules.items() if mm is m]
            if isinstance(m, nn.Module) and names:
                return names[0], m
        emb = [n for n, m in self._modules.items() if isinstance(m, nn.Embedding)]
        if len(emb) == 1:
            return emb[0], self._modules[emb[0]]
        raise ModelError(
            f"perturbing token inputs moves the output of the token-embedding layer, but the model has "
            f"{len(emb)} nn.Embedding layers ({emb[:6]}) and no get_input_embeddings(). Pass "
            "Probe(model, embeddings='<name of the token embedding layer>')."
        )

    @contextlib.contextmanager
    def model_inputs(self, x: "Inputs | ShiftedTokens") -> Iterator[Inputs]:
        """The inputs to call the model with; for :class:`ShiftedTokens`, with a forward hook that adds the
        shift to the token-embedding layer's output while the context is open (e.g. around a call of the
        gradient engine)."""
        if not isinstance(x, ShiftedTokens):
            yield x
            return
        name, layer = self.embedding_layer()
        delta = x.delta

        def shift(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
            if out.shape != delta.shape:
                if not torch.is_grad_enabled() and out.shape[1:] == delta.shape[1:]:
                    return out  # a no_grad pass on a few samples to find the module order (the engine's)
                raise ModelError(
                    f"the embedding shift of shape {tuple(delta.shape)} does not fit the output of {name!r}, "
                    f"{tuple(out.shape)}: perturbed token inputs must run through the model in one batch (a "
                    "per-sample fallback of the gradient engine cannot apply them)."
                )
            return out + delta.to(out.dtype)

        h = layer.register_forward_hook(shift)
        try:
            yield x.inputs
        finally:
            h.remove()

    @contextlib.contextmanager
    def embedding_leaf(self) -> Iterator[list[torch.Tensor]]:
        """While open, every output of the token-embedding layer is replaced by an autograd leaf (appended
        to the yielded list) so that the gradient of a loss with respect to the token embeddings can be
        taken, whether or not the embedding table requires grad."""
        _, layer = self.embedding_layer()
        leaves: list[torch.Tensor] = []

        def leaf(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
            e = out.detach().requires_grad_(True)
            leaves.append(e)
            return e.clone()  # in-place ops after the layer stay legal

        h = layer.register_forward_hook(leaf)
        try:
            yield leaves
        finally:
            h.remove()

    @property
    def input_shape(self) -> Any:
        """Per-sample input shape, known once a batch has run (for dict inputs: ``{key: shape}`` of the
        first batch)."""
        return self._input_shape

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map inputs in [0, 1]-pixel units to the model's input space with ``input_mean``/``input_std``."""
        def per_channel(v: Any) -> torch.Tensor:
            t = torch.as_tensor(v, dtype=pixels.dtype, device=pixels.device).flatten()
            return t.reshape(()) if t.numel() == 1 else t.reshape(1, -1, *([1] * (pixels.ndim - 2)))

        mean = 0.0 if self.input_mean is None else per_channel(self.input_mean)
        std = 1.0 if self.input_std is None else per_channel(self.input_std)
        return (pixels - mean) / std

    def default_layers(self) -> list[str]:
        """Layers to tap when a multi-layer method is not told which: every activation module (ReLU family,
        GELU, SiLU...) that the forward pass reaches exactly once, in forward order; if the model uses
        functional activations only, the outputs of its top-level children (those that output a tensor). Needs one batch to have run."""
        if self._example is None:
            raise ModelError("run at least one batch through the probe before asking for its default layers.")
        acts = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish)
        calls: dict[str, int] = {}
        order: list[str] = []

        def hook(name: str):
            def fn(_m: nn.Module, _i: Any, o: Any) -> None:
                # a layer returning a tuple / ModelOutput (a whole transformer) cannot be tapped
                calls[name] = calls.get(name, 0) + (1 if isinstance(o, torch.Tensor) else 2)
                if name not in order:
                    order.append(name)
            return fn

        # transformers' activations (GELUActivation & co.) are their own nn.Module classes
        candidates = {n: m for n, m in self._modules.items()
                      if n and (isinstance(m, acts) or type(m).__module__ == "transformers.activations")}
        if not candidates:
            candidates = {n: m for n, m in self.model.named_children() if n != self.head_name}
        handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
        try:
            with torch.no_grad(), self.eval_mode():
                call_model(self.model, self._example)
        finally:
            for h in handles:
                h.remove()
        return [n for n in order if calls[n] == 1]

    # ------------------------------------------------------------------ data
    def signals(self, data: Any, *, batch_size: int = 128, name: str = "data", cache_dir: Any = None,
                progress: bool = True, checkpoint_every: int = 50) -> "Signals":
        """A lazy :class:`~gradood.signals.Signals` over ``data`` (DataLoader, Dataset, tensor, array,
        ``(inputs, labels)``, or a dict of equal-length tensors / a tokenizer's ``BatchEncoding``, with labels
        under ``"labels"`` or ``"label"``). Nothing runs until a detector asks for signals; then one pass
        computes all of them. ``cache_dir`` keeps them on disk (resumable, atomic writes)."""
        from ._batches import BatchSource
        from .signals import Signals

        return Signals(source=BatchSource(data, batch_size=batch_size), probe=self, name=name,
                       cache_dir=cache_dir, progress=progress, checkpoint_every=checkpoint_every)

    def __repr__(self) -> str:
        return f"Probe({type(self.model).__name__}, head={self.head_name!r})"


def input_step_scale(probe: Probe, x: torch.Tensor) -> torch.Tensor | float:
    """Factor that turns a step in [0, 1]-pixel units into the model's (normalised) input space.

    ODIN's convention: the sign of the input gradient is divided by the per-channel normalisation std.
    Returns a tensor broadcastable to ``x`` (channel dimension 1) or 1.0 when inputs are not normalised.
    """
    std = probe.input_std
    if std is None:
        return 1.0
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).flatten()
    if s.numel() == 1:
        return 1.0 / s.reshape(())
    if x.ndim < 2 or x.shape[1] != s.numel():
        raise InputError(f"input_std has {s.numel()} channels but inputs have shape {tuple(x.shape)}.")
    return (1.0 / s).reshape(1, -1, *([1] * (x.ndim - 2)))
