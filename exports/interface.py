"""The one declaration of every exported graph's inputs, outputs and dynamic axes.

The exporter (`exports/onnx_export.py`), the precision tools, the edge runtime and the parity
report all read names and axes from here, so a renamed tensor cannot drift between them.
This module imports nothing beyond the standard library: the edge runtime uses it too.

An axis is a string when it is dynamic (its symbolic name in the ONNX graph) and ``None`` when
it is fixed at export time (channels, image height and width, embedding size, class count).
CLIP's vision tower has position embeddings for one resolution, so only the batch is dynamic
for images; text graphs also take any sequence length up to the model's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 18  # optimum's recommended minimum for CLIP; LayerNormalization needs >= 17


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    axes: tuple[str | None, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if a is not None}


@dataclass(frozen=True)
class GraphSpec:
    """Name, inputs and outputs of one exported graph."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """In the form ``torch.onnx.export(dynamic_axes=...)`` expects."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"


IMAGE_ENCODER = GraphSpec(
    name="image_encoder",
    inputs=(TensorSpec("pixel_values", "float32", ("batch", None, None, None)),),
    # L2-normalised, shape (batch, embed_dim)
    outputs=(TensorSpec("image_embeds", "float32", ("batch", None)),),
)

TEXT_ENCODER = GraphSpec(
    name="text_encoder",
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "sequence")),
    ),
    outputs=(TensorSpec("text_embeds", "float32", ("batch", None)),),
)

ZERO_SHOT_CLASSIFIER = GraphSpec(
    name="zeroshot_classifier",
    inputs=(TensorSpec("pixel_values", "float32", ("batch", None, None, None)),),
    # logits = logit_scale * image_embeds @ class_embeddings.T; probs = softmax(logits)
    outputs=(
        TensorSpec("logits", "float32", ("batch", None)),
        TensorSpec("probs", "float32", ("batch", None)),
    ),
)
