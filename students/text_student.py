"""Text students: a small BERT sentence encoder in a tower teacher's embedding space.

The reference teacher's text side (:class:`clipcore.towers.TowerDualEncoder`) is all-MiniLM-L6-v2
(6 BERT layers, width 384, a 30,522 x 384 token table: 22.7M parameters), mean-pooled,
L2-normalised and mapped into the embedding space by an MLP head. A text student keeps that
pipeline and the teacher's tokenizer but is smaller in three ways, each inherited from the
teacher (TinyCLIP-style weight inheritance, :func:`inherit_text_from_teacher`):

* fewer layers: the teacher layers named by the config (e.g. the first and the last) are copied;
* a narrower feed-forward block: the neurons of largest weight norm are kept;
* a factorised token table: ``vocab x r`` and ``r x width``, initialised from the truncated SVD of
  the teacher's table (exact at full rank).

Its own projection head starts as a copy of the teacher's text head. A :class:`TextStudent` has no
image side; :class:`students.paired.PairedStudent` pairs it with any image model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipcore.dual_encoder import encode_text_with, module_fingerprint
from clipcore.towers import projection_head
from students.configs import TextStudentConfig

logger = logging.getLogger(__name__)


class FactorisedEmbedding(nn.Module):
    """Token embeddings as a ``(vocab, rank)`` table times a ``(rank, width)`` up-projection.

    ``vocab * rank + rank * width`` parameters instead of ``vocab * width``: at rank 64 and width
    384, 1/6 of MiniLM's 11.7M-parameter table.
    """

    def __init__(self, vocab_size: int, rank: int, width: int):
        super().__init__()
        if not 1 <= rank <= width:
            raise ValueError(f"token-embedding rank {rank} must be in [1, width {width}]")
        self.table = nn.Embedding(vocab_size, rank)
        self.up = nn.Linear(rank, width, bias=False)

    @property
    def rank(self) -> int:
        return self.table.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(input_ids))

    @torch.no_grad()
    def init_from_svd(self, weight: torch.Tensor) -> None:
        """The best rank-r approximation of ``weight`` (vocab, width): ``U_r sqrt(S_r)`` as the table
        and ``sqrt(S_r) V_r^T`` as the up-projection; each factor gets half of the singular values,
        so that both start at comparable scales and train at comparable rates."""
        if tuple(weight.shape) != (self.table.num_embeddings, self.up.out_features):
            raise ValueError(f"cannot factorise a {tuple(weight.shape)} table into "
                             f"({self.table.num_embeddings}, {self.rank}) x ({self.rank}, {self.up.out_features})")
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[: self.rank].sqrt()
        self.table.weight.copy_(u[:, : self.rank] * root)
        self.up.weight.copy_((root[:, None] * vh[: self.rank]).t())


def student_bert_config(cfg: TextStudentConfig, teacher_config, max_length: int):
    """The teacher's ``BertConfig`` with the student's depth, feed-forward width and context."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(cfg.layers)
    config.intermediate_size = cfg.intermediate or teacher_config.intermediate_size
    config.max_position_embeddings = max_length
    return config


class TextStudent(nn.Module):
    """BERT encoder (factorised token table optional) -> masked mean -> L2 norm -> projection head.

    The same pooling as the reference teacher's text tower (``TowerDualEncoder.text_tower_features``),
    so that the copied teacher head sees inputs of the kind it was trained on.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, tokenizer, *, embed_dim: int, name: str,
                 arch: str, max_length: int):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.tokenizer = tokenizer
        self.name = name
        self.arch = arch
        self.max_length = int(max_length)
        self._embed_dim = int(embed_dim)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def rank(self) -> int | None:
        table = self.encoder.embeddings.word_embeddings
        return table.rank if isinstance(table, FactorisedEmbedding) else None

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # the teacher's settings (TowerDualEncoder.tokenize): dynamic padding, truncation at max_length
        out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Masked mean of the last hidden states, L2-normalised (all-MiniLM-L6-v2's sentence embedding)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Unnormalised embeddings in the teacher's space, shape (B, D)."""
        return self.head(self.pooled(input_ids, attention_mask))

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_features(input_ids, attention_mask).float(), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of ``texts`` (the ``DualEncoder.encode_text`` contract)."""
        return encode_text_with(self, texts)

    def fingerprint(self) -> str:
        return module_fingerprint(self, extra=f"{self.arch}/{self.max_length}")


def build_text_encoder(config, rank: int | None) -> nn.Module:
    """``BertModel`` of ``config`` without its pooler (unused: pooling is the masked mean), with a
    factorised token table when ``rank`` is given."""
    from transformers import BertModel

    encoder = BertModel(config, add_pooling_layer=False)
    if rank is not None:
        encoder.embeddings.word_embeddings = FactorisedEmbedding(config.vocab_size, rank, config.hidden_size)
    return encoder


def head_hidden_of(head: nn.Module) -> int | None:
    """The MLP head's hidden size, or None for the bias-free linear head (``projection_head``'s two forms)."""
    return head[0].out_features if isinstance(head, nn.Sequential) else None


def _teacher_text_side(teacher) -> tuple[nn.Module, nn.Module]:
    """A tower teacher's BERT text tower and its text head, or a TypeError naming what is missing."""
    tower, head = getattr(teacher, "text_tower", None), getattr(teacher, "text_head", None)
    config = getattr(tower, "config", None)
    if tower is None or head is None or getattr(config, "model_type", None) != "bert":
        name = getattr(teacher, "name", type(teacher).__name__)
        raise TypeError(f"a text student is built from a tower teacher with a BERT text tower and a text head "
                        f"(clipcore.towers, e.g. outputs/reference-zeroshot/final); teacher {name!r} has none")
    return tower, head


def build_text_student(cfg: TextStudentConfig, teacher, *, init: str | None = "teacher") -> TextStudent:
    """A text student of ``cfg`` for ``teacher``'s tokenizer and embedding space.

    Args:
        cfg: the architecture (layers, rank, feed-forward width, head).
        teacher: a tower teacher (:class:`clipcore.towers.TowerDualEncoder`): its text tower sets the
            width, heads and vocabulary, its tokenizer is the student's, its head sets the embedding size.
        init: ``"teacher"`` (inherit, :func:`inherit_text_from_teacher`) or None (random weights).

    Returns:
        the :class:`TextStudent`, in train mode.

    Raises:
        TypeError: the teacher has no BERT text tower and text head.
        ValueError: an unknown ``init``, or a config the teacher cannot supply (layers, widths).
    """
    if init not in ("teacher", None):
        raise ValueError(f"text student init={init!r}; expected 'teacher' or null (random weights)")
    tower, teacher_head = _teacher_text_side(teacher)
    resolve_layers(cfg, tower.config.num_hidden_layers)  # fails early, before anything is built
    max_length = cfg.max_length or int(getattr(getattr(teacher, "spec", None), "text_max_length", 64))
    encoder = build_text_encoder(student_bert_config(cfg, tower.config, max_length), cfg.rank)
    hidden = head_hidden_of(teacher_head) if cfg.head == "teacher" else None
    head = projection_head(tower.config.hidden_size, teacher.embed_dim, hidden)
    student = TextStudent(encoder, head, teacher.tokenizer, embed_dim=teacher.embed_dim, name=cfg.name,
                          arch=cfg.name, max_length=max_length)
    if init == "teacher":
        inherit_text_from_teacher(student, teacher, cfg)
    return student.train()


# ----------------------------------------------------------------------------------- inheritance


def resolve_layers(cfg: TextStudentConfig, teacher_layers: int) -> list[int]:
    """``cfg.layers`` as non-negative teacher indices (``-1`` is the last), checked.

    Raises:
        ValueError: an index outside the teacher, a repeat, or an order that is not increasing.
    """
    picks = [i + teacher_layers if i < 0 else i for i in cfg.layers]
    if any(not 0 <= i < teacher_layers for i in picks):
        raise ValueError(f"{cfg.name}: layers {list(cfg.layers)} name layers outside the teacher's {teacher_layers}")
    if picks != sorted(set(picks)):
        raise ValueError(f"{cfg.name}: layers {list(cfg.layers)} must be distinct and in increasing order")
    return picks


@dataclass
class TextInheritReport:
    """What :func:`inherit_text_from_teacher` did: the teacher layer behind each student layer, the
    token-table rank and share of its energy kept, and the feed-forward neurons kept per layer."""

    layer_map: list[int]
    rank: int | None
    table_energy: float = 1.0
    ffn_kept: dict[int, int] = field(default_factory=dict)
    head: str = "copied"

    def summary(self) -> str:
        table = "full token table" if self.rank is None else \
            f"token table rank {self.rank} ({self.table_energy:.1%} of its energy)"
        ffn = f"; feed-forward neurons kept {self.ffn_kept}" if self.ffn_kept else ""
        return f"layers <- teacher {self.layer_map}; {table}{ffn}; head {self.head}"


def ffn_importance(layer: nn.Module) -> torch.Tensor:
    """Per feed-forward neuron: the norm of its input weights times that of its output weights
    (its largest possible contribution to the layer's output, up to the activation)."""
    w_in, w_out = layer.intermediate.dense.weight, layer.output.dense.weight  # (I, H), (H, I)
    return w_in.norm(dim=1) * w_out.norm(dim=0)


@torch.no_grad()
def _copy_layer(dst: nn.Module, src: nn.Module) -> int | None:
    """Copy a BERT layer; a narrower feed-forward block keeps the teacher's most important neurons
    (in their original order). Returns how many were kept when it is narrower, else None."""
    width = dst.intermediate.dense.out_features
    if width == src.intermediate.dense.out_features:
        dst.load_state_dict(src.state_dict())
        return None
    keep = ffn_importance(src).topk(width).indices.sort().values
    state = dict(src.state_dict())
    state["intermediate.dense.weight"] = state["intermediate.dense.weight"][keep]
    state["intermediate.dense.bias"] = state["intermediate.dense.bias"][keep]
    state["output.dense.weight"] = state["output.dense.weight"][:, keep]
    dst.load_state_dict(state)
    return width


@torch.no_grad()
def _copy_embeddings(dst: nn.Module, src: nn.Module, rank: int | None) -> float:
    """Positions (truncated to the student's context), token types and LayerNorm copied; the token
    table copied, or factorised by SVD. Returns the share of the table's energy kept."""
    positions = dst.position_embeddings.weight.shape[0]
    dst.position_embeddings.weight.copy_(src.position_embeddings.weight[:positions])  # absolute: a prefix is exact
    dst.token_type_embeddings.load_state_dict(src.token_type_embeddings.state_dict())
    dst.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
    table = src.word_embeddings.weight
    if rank is None:
        dst.word_embeddings.weight.copy_(table)
        return 1.0
    dst.word_embeddings.init_from_svd(table)
    s = torch.linalg.svdvals(table.float())
    return float((s[:rank] ** 2).sum() / (s**2).sum())


@torch.no_grad()
def inherit_text_from_teacher(student: TextStudent, teacher, cfg: TextStudentConfig) -> TextInheritReport:
    """Copy ``teacher``'s text tower and head into ``student``, in place (see the module docstring).

    Raises:
        TypeError: the teacher has no BERT text tower and text head.
        ValueError: the widths differ (hidden size, heads, vocabulary, head shape), naming each.
    """
    tower, teacher_head = _teacher_text_side(teacher)
    problems = [f"{key}: student {getattr(student.encoder.config, key)} != teacher {getattr(tower.config, key)}"
                for key in ("hidden_size", "num_attention_heads", "vocab_size")
                if getattr(student.encoder.config, key) != getattr(tower.config, key)]
    if problems:
        raise ValueError(f"cannot inherit {teacher.name!r}'s text tower into {student.name!r}: " + "; ".join(problems))
    picks = resolve_layers(cfg, tower.config.num_hidden_layers)
    report = TextInheritReport(picks, student.rank)
    report.table_energy = _copy_embeddings(student.encoder.embeddings, tower.embeddings, student.rank)
    for i, (dst, k) in enumerate(zip(student.encoder.encoder.layer, picks)):
        kept = _copy_layer(dst, tower.encoder.layer[k])
        if kept is not None:
            report.ffn_kept[i] = kept
    if _same_shapes(student.head, teacher_head):
        student.head.load_state_dict(teacher_head.state_dict())
    else:
        report.head = f"random ({type(student.head).__name__}; the teacher's is {type(teacher_head).__name__})"
    logger.info("%s: %s", student.name, report.summary())
    return report


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def text_student_meta(student: TextStudent) -> dict[str, Any]:
    """What ``student.json`` records to rebuild the architecture without the teacher."""
    return {"kind": "text", "arch": student.arch, "bert_config": student.encoder.config.to_dict(),
            "rank": student.rank, "head_hidden": head_hidden_of(student.head), "embed_dim": student.embed_dim,
            "max_length": student.max_length}


def text_student_from_meta(meta: dict[str, Any], tokenizer, name: str) -> TextStudent:
    """The architecture of a saved text student (random weights, to be loaded into)."""
    from transformers import BertConfig

    config = BertConfig.from_dict(meta["bert_config"])
    encoder = build_text_encoder(config, meta.get("rank"))
    head = projection_head(config.hidden_size, int(meta["embed_dim"]), meta.get("head_hidden"))
    return TextStudent(encoder, head, tokenizer, embed_dim=int(meta["embed_dim"]), name=name, arch=meta["arch"],
                       max_length=int(meta["max_length"]))
