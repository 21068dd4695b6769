"""Fitted state as a JSON tree plus named tensors, and back -- without pickle and without running code.

A detector's fitted state is made of numbers, strings, tensors, numpy arrays, tuples/lists/dicts of those, and
a few kinds of objects (gradood dataclasses such as a tied Gaussian, a layer combiner, a gradient basis; small
``torch.nn`` modules; scikit-learn's logistic regressions). :func:`encode` turns such a value into a JSON-able
tree whose leaves name tensors kept apart (written to safetensors); :func:`decode` rebuilds it.

Why this is safe to load from a file someone sent you: decoding only creates JSON values, tensors read by
safetensors, and instances of an allow-list of classes (those defined in gradood's detector, gradient and
signal modules, ``torch.nn``'s built-in modules, and scikit-learn's two logistic regressions). An object is
rebuilt with ``object.__new__`` and its attribute dict is filled with decoded data: no constructor, no
``__setstate__`` of the class, no ``__reduce__``, no import driven by the file (a class is looked up among
already imported modules), no ``eval``. A name outside the allow-list is an error.

Objects keep their identity: a value referenced twice (a basis held by a detector and by its request) is
stored once and decoded as one object. Attributes named ``_..._cache`` are caches: stored as ``None``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError

#: modules whose classes may appear in a saved state (prefix match on the defining module)
_ALLOWED_PREFIXES = ("gradood.detectors.", "gradood.grads.", "gradood.signals", "torch.nn.modules.")
#: scikit-learn estimators that may appear (exact ``module:qualname``): imported by gradood itself, never by name
_SKLEARN_ALLOWED = {
    "sklearn.linear_model._logistic:LogisticRegression": ("sklearn.linear_model", "LogisticRegression"),
    "sklearn.linear_model._logistic:LogisticRegressionCV": ("sklearn.linear_model", "LogisticRegressionCV"),
}
#: nn.Module attributes that hold hooks (callables): must be empty to save; rebuilt empty on load
_MODULE_HOOK_ATTRS = frozenset({
    "_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
})
_TENSOR_KINDS = "biuf"  # numpy dtype kinds that safetensors stores (bool, ints, floats)


def class_ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_allowed_ref(ref: str) -> bool:
    module = ref.partition(":")[0]
    return ref in _SKLEARN_ALLOWED or any(module == p.rstrip(".") or module.startswith(p) for p in _ALLOWED_PREFIXES)


class Encoder:
    """Collects tensors while encoding; ``tensors`` maps key -> CPU contiguous tensor for safetensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._ids: dict[int, int] = {}
        self._keep: list[Any] = []  # keep encoded objects alive so that id() stays unique

    def encode(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and not isinstance(value, np.integer):
            return value
        if isinstance(value, np.generic):  # before float: np.float64 is a float subclass, keep its type
            return self._np_scalar(value, path)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {"$tuple": [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, (set, frozenset)):
            items = sorted(value, key=repr)
            return {"$set": [self.encode(v, f"{path}{{}}") for v in items]}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"$dict": {k: self.encode(v, f"{path}.{k}") for k, v in value.items()}}
            return {"$items": [[self.encode(k, f"{path}<key>"), self.encode(v, f"{path}[{k!r}]")]
                               for k, v in value.items()]}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        # from here on: values with identity (stored once, referenced after)
        seen = self._ids.get(id(value))
        if seen is not None:
            return {"$ref": seen}
        ident = len(self._ids)
        self._ids[id(value)] = ident
        self._keep.append(value)
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path, ident)
        if isinstance(value, np.ndarray):
            return self._ndarray(value, path, ident)
        if isinstance(value, nn.Module):
            return self._module(value, path, ident)
        return self._object(value, path, ident)

    # ------------------------------------------------------------------ leaves
    def _np_scalar(self, value: np.generic, path: str) -> Any:
        if value.dtype.kind not in _TENSOR_KINDS:
            raise ConfigError(f"cannot save {path}: numpy scalar of dtype {value.dtype} (only bool/int/float).")
        item = value.item()
        return {"$np": value.dtype.str, "v": item if math.isfinite(float(item)) else {"$float": repr(float(item))}}

    def _add_tensor(self, t: torch.Tensor, path: str) -> str:
        key = f"t{len(self.tensors)}:{path}"[:200]
        # a private contiguous copy: safetensors refuses tensors that share memory
        self.tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def _tensor(self, value: torch.Tensor, path: str, ident: int) -> dict[str, Any]:
        if value.is_complex() or value.is_quantized or value.is_sparse:
            raise ConfigError(f"cannot save {path}: tensor of dtype {value.dtype} / layout {value.layout}.")
        node: dict[str, Any] = {"$tensor": self._add_tensor(value, path), "$id": ident}
        if isinstance(value, nn.Parameter):
            node["param"] = bool(value.requires_grad)
        return node

    def _ndarray(self, value: np.ndarray, path: str, ident: int) -> dict[str, Any]:
        if value.dtype == object and all(v is None or isinstance(v, (bool, int, float, str)) for v in value.flat):
            # e.g. scikit-learn's l1_ratio_ = array([None]): plain values, stored in the JSON
            return {"$objarray": [self.encode(v, path) for v in value.flat], "shape": list(value.shape), "$id": ident}
        if value.dtype.kind not in _TENSOR_KINDS:
            raise ConfigError(f"cannot save {path}: numpy array of dtype {value.dtype} (only bool/int/float arrays, "
                              "or object arrays of plain numbers/strings/None; anything else would need pickle).")
        arr = np.ascontiguousarray(value)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return {"$ndarray": self._add_tensor(torch.from_numpy(arr), path), "$id": ident}

    # ------------------------------------------------------------------ objects
    def _check_class(self, cls: type, path: str) -> str:
        ref = class_ref(cls)
        if not _is_allowed_ref(ref):
            raise ConfigError(
                f"cannot save {path}: an object of class {ref}, which gradood does not know how to store without "
                "pickle. Fitted state may hold numbers, strings, tensors, numpy arrays, lists/tuples/dicts of "
                "those, and objects of gradood's detector/gradient classes, torch.nn modules or scikit-learn "
                "logistic regressions; keep anything else (e.g. a faiss index) as a cache rebuilt from those.")
        return ref

    def _module(self, value: nn.Module, path: str, ident: int) -> dict[str, Any]:
        ref = self._check_class(type(value), path)
        state = {}
        for k, v in vars(value).items():
            if k in _MODULE_HOOK_ATTRS:
                if v:
                    raise ConfigError(f"cannot save {path}: module {ref} has hooks registered ({k}); remove them.")
                continue
            state[k] = v
        return {"$module": ref, "$id": ident, "state": self.encode(state, path)}

    def _object(self, value: Any, path: str, ident: int) -> dict[str, Any]:
        if callable(value) and not hasattr(value, "__dict__"):
            raise ConfigError(f"cannot save {path}: a function/callable ({type(value).__name__}).")
        ref = self._check_class(type(value), path)
        if not hasattr(value, "__dict__") or getattr(type(value), "__slots__", None):
            raise ConfigError(f"cannot save {path}: {ref} keeps its state in __slots__, not in attributes.")
        state = {k: (None if _is_cache(k) else v) for k, v in vars(value).items()}
        return {"$object": ref, "$id": ident, "state": self.encode(state, path)}


def _is_cache(name: str) -> bool:
    return name.startswith("_") and name.endswith("_cache")


def encode(value: Any, path: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(json tree, {key: tensor})`` for ``value``; :class:`ConfigError` naming the first value that cannot be
    stored without pickle."""
    enc = Encoder()
    return enc.encode(value, path), enc.tensors


# ---------------------------------------------------------------------- decoding
class Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where
        self._objects: dict[int, Any] = {}

    def _bad(self, msg: str) -> InputError:
        return InputError(f"{self.where} is not a valid gradood detector folder: {msg}. Re-save it with "
                          "detector.save(path) (or gradood fit).")

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict) or len(node) == 0:
            raise self._bad(f"unexpected value {str(node)[:60]!r}")
        tag = next((k for k in node if k.startswith("$") and k != "$id"), None)
        handler = _DECODERS.get(tag or "")
        if handler is None:
            raise self._bad(f"unknown entry {sorted(node)[:4]}")
        return handler(self, node)

    def _remember(self, node: dict[str, Any], obj: Any) -> Any:
        ident = node.get("$id")
        if ident is not None:
            if not isinstance(ident, int) or ident in self._objects:
                raise self._bad(f"object id {ident!r} is invalid or used twice")
            self._objects[ident] = obj
        return obj

    def _ref(self, node: dict[str, Any]) -> Any:
        ident = node["$ref"]
        if not isinstance(ident, int) or ident not in self._objects:
            raise self._bad(f"reference to unknown object {ident!r}")
        return self._objects[ident]

    def _float(self, node: dict[str, Any]) -> float:
        v = node["$float"]
        if v not in ("inf", "-inf", "nan"):
            raise self._bad(f"float {v!r}")
        return float(v)

    def _np(self, node: dict[str, Any]) -> Any:
        try:
            dt = np.dtype(str(node["$np"]))
        except TypeError:
            raise self._bad(f"numpy dtype {node['$np']!r}") from None
        if dt.kind not in _TENSOR_KINDS:
            raise self._bad(f"numpy dtype {dt}")
        v = self.decode(node.get("v"))
        if isinstance(v, np.generic) or not isinstance(v, (bool, int, float)):
            raise self._bad("numpy scalar without a number")
        return dt.type(v)

    def _tuple(self, node: dict[str, Any]) -> tuple:
        return tuple(self.decode(v) for v in self._list(node["$tuple"]))

    def _set(self, node: dict[str, Any]) -> set:
        return set(self.decode(v) for v in self._list(node["$set"]))

    def _list(self, v: Any) -> list:
        if not isinstance(v, list):
            raise self._bad("a list was expected")
        return v

    def _dict(self, node: dict[str, Any]) -> dict:
        d = node["$dict"]
        if not isinstance(d, dict):
            raise self._bad("a mapping was expected")
        return {k: self.decode(v) for k, v in d.items()}

    def _items(self, node: dict[str, Any]) -> dict:
        out = {}
        for pair in self._list(node["$items"]):
            if not isinstance(pair, list) or len(pair) != 2:
                raise self._bad("a [key, value] pair was expected")
            k = self.decode(pair[0])
            try:
                hash(k)
            except TypeError:
                raise self._bad("a dict key is not hashable") from None
            out[k] = self.decode(pair[1])
        return out

    def _dtype(self, node: dict[str, Any]) -> torch.dtype:
        d = getattr(torch, str(node["$dtype"]), None)
        if not isinstance(d, torch.dtype):
            raise self._bad(f"torch dtype {node['$dtype']!r}")
        return d

    def _device(self, node: dict[str, Any]) -> torch.device:
        try:
            return torch.device(str(node["$device"]))
        except RuntimeError:
            raise self._bad(f"device {node['$device']!r}") from None

    def _tensor_of(self, key: Any) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise self._bad(f"tensor {key!r} is missing from the safetensors file")
        return self.tensors[key]

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        t = self._tensor_of(node["$tensor"])
        if "param" in node:
            t = nn.Parameter(t, requires_grad=bool(node["param"]))
        return self._remember(node, t)

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray:
        return self._remember(node, self._tensor_of(node["$ndarray"]).numpy())

    def _objarray(self, node: dict[str, Any]) -> np.ndarray:
        items = [self.decode(v) for v in self._list(node["$objarray"])]
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
            raise self._bad("an object array may hold only plain values")
        shape = self._list(node.get("shape"))
        if not all(isinstance(d, int) and d >= 0 for d in shape) or int(np.prod(shape)) != len(items):
            raise self._bad(f"object array shape {shape} does not match its {len(items)} values")
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return self._remember(node, arr.reshape(shape))

    def _class(self, ref: Any) -> type:
        if not isinstance(ref, str) or not _is_allowed_ref(ref):
            raise self._bad(f"it names the class {str(ref)[:80]!r}, which is not one gradood restores "
                            "(only gradood detector/gradient classes, torch.nn modules and scikit-learn "
                            "logistic regressions)")
        if ref in _SKLEARN_ALLOWED:
            import importlib

            module_name, attr = _SKLEARN_ALLOWED[ref]
            return getattr(importlib.import_module(module_name), attr)  # a fixed module, not the file's
        module_name, _, qualname = ref.partition(":")
        obj: Any = sys.modules.get(module_name)  # never import a module named by the file
        for part in qualname.split("."):
            if obj is None or not part.isidentifier() or part.startswith("__"):
                obj = None
                break
            obj = getattr(obj, part, None)
        if not isinstance(obj, type):
            raise self._bad(f"the class {ref!r} does not exist in this version of gradood/torch")
        return obj

    def _state(self, node: dict[str, Any]) -> dict[str, Any]:
        state = self.decode(node.get("state"))
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise self._bad("an object's state must be a mapping of attribute names")
        return state

    def _module(self, node: dict[str, Any]) -> nn.Module:
        cls = self._class(node["$module"])
        if not issubclass(cls, nn.Module):
            raise self._bad(f"{node['$module']!r} is not a torch module")
        obj = self._remember(node, object.__new__(cls))
        # empty hook containers as torch's own nn.Module() has them, then the saved attributes
        obj.__dict__.update({k: type(v)() for k, v in vars(nn.Module()).items() if k in _MODULE_HOOK_ATTRS})
        obj.__dict__.update(self._state(node))
        return obj

    def _object(self, node: dict[str, Any]) -> Any:
        cls = self._class(node["$object"])
        if issubclass(cls, nn.Module):
            raise self._bad(f"{node['$object']!r} is a module stored as a plain object")
        obj = self._remember(node, object.__new__(cls))
        obj.__dict__.update(self._state(node))
        return obj


_DECODERS = {
    "$ref": Decoder._ref, "$float": Decoder._float, "$np": Decoder._np, "$tuple": Decoder._tuple,
    "$set": Decoder._set, "$dict": Decoder._dict, "$items": Decoder._items, "$dtype": Decoder._dtype,
    "$device": Decoder._device, "$tensor": Decoder._tensor, "$ndarray": Decoder._ndarray, "$objarray": Decoder._objarray,
    "$module": Decoder._module, "$object": Decoder._object,
}


def decode(tree: Any, tensors: dict[str, torch.Tensor], where: str = "the folder") -> Any:
    """Rebuild a value from :func:`encode`'s output; :class:`InputError` for anything unexpected."""
    return Decoder(tensors, where).decode(tree)
