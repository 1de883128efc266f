"""onnx schemas for the ONNX Runtime contrib ops that edgedec's passes emit, so ``onnx.checker`` knows them.

onnx ships no schemas for ONNX Runtime's own operators. These declare the subset of each signature the
passes use; ONNX Runtime validates the nodes against its real schemas when it loads the graph.
``SimplifiedLayerNormalization`` lives in ONNX Runtime's default (``""``) domain at version 1.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(name, type_str, param_option=option)


def _schemas() -> list[OpSchema]:
    eps = OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, required=False)
    return [
        OpSchema(
            "SimplifiedLayerNormalization", "", 1,
            inputs=[_param("X", "T"), _param("scale", "V")],
            outputs=[_param("Y", "V"), _param("inv_std_var", "U", optional=True)],
            type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], ""), ("V", _FLOATS, "")],
            attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, required=False), eps,
                        OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, required=False)],
        ),
        OpSchema(
            "SkipSimplifiedLayerNormalization", "com.microsoft", 1,
            inputs=[_param("input", "T"), _param("skip", "T"), _param("gamma", "T"), _param("bias", "T", True)],
            outputs=[_param("output", "T"), _param("mean", "U", True), _param("inv_std_var", "U", True),
                     _param("input_skip_bias_sum", "T", True)],
            type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], "")],
            attributes=[eps],
        ),
    ]


def register() -> None:
    """Declare the schemas once per process (a no-op when onnx already knows them)."""
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)
