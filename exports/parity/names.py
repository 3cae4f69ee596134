"""The variant names a parity run knows, apart from the modules that build and gate them: the gates
check their keys against these names, and the variant builders import the gates, so the names sit
below both."""

from __future__ import annotations

from exports import providers as prov
from exports.int8_scheme import AUTO_INT8
from exports.precision import PRECISIONS, W8A16

DEFAULT_VARIANTS = (*PRECISIONS, *prov.ACCELERATED_VARIANTS)
# also accepted: "int8", the int8 scheme that suits the student's graph (exports.int8_scheme), and
# "w8a16" (int8 weights, 16-bit activations: for transformers where dynamic int8 loses agreement)
KNOWN_VARIANTS = (*DEFAULT_VARIANTS, W8A16, AUTO_INT8)
TEXT_VARIANTS = ("text-fp32", "text-int8")  # a bundle's text encoder (exports.text_parity)
__all__ = ["DEFAULT_VARIANTS", "KNOWN_VARIANTS", "TEXT_VARIANTS"]
