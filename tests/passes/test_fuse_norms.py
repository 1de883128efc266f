"""fuse-norms on the tiny decoders: every RMSNorm fused, residual Adds folded in, outputs unchanged."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from edgedec.passes.base import PassError, create_pass

from test_fuse_projections import _run


@pytest.fixture(scope="module")
def unfused(tiny, tmp_path_factory):
    from edgedec.compiler import export
    from edgedec.models.source import load

    loaded = load(str(tiny["dir"]))
    path = export.export_decoder(loaded.model, loaded.arch, tmp_path_factory.mktemp("unfused") / "d.onnx", 64)
    return onnx.load(str(path)), loaded.arch


def test_norms_and_residual_adds_fuse_without_changing_outputs(unfused):
    model, arch = unfused
    result = create_pass("fuse-norms")(model)
    ops = Counter(n.op_type for n in result.model.graph.node)
    norms = 2 * arch.num_layers + 1  # two per layer and the final one
    assert result.modified and result.report["norms"] == norms
    assert ops["ReduceMean"] == 0
    # every residual Add feeding a norm is folded in, except the first (it adds to the embedding Gather)
    assert ops["SkipSimplifiedLayerNormalization"] == result.report["skip_norms"] == norms - 2
    assert ops["Add"] < Counter(n.op_type for n in model.graph.node)["Add"]
    np.testing.assert_allclose(_run(result.model), _run(model), rtol=0, atol=1e-5)


def test_without_skip_only_norms_fuse(unfused):
    model, arch = unfused
    result = create_pass("fuse-norms", {"skip": False})(model)
    ops = Counter(n.op_type for n in result.model.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 2 * arch.num_layers + 1
    assert ops["SkipSimplifiedLayerNormalization"] == 0


def test_second_run_changes_nothing(unfused):
    p = create_pass("fuse-norms")
    once = p(unfused[0]).model
    again = p(once)
    assert not again.modified and len(again.model.graph.node) == len(once.graph.node)


def test_graph_without_norms_is_refused():
    graph = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }""")
    with pytest.raises(PassError, match="no RMSNorm found"):
        create_pass("fuse-norms")(graph)
