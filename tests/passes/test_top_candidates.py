"""Pass top-candidates: the graph emits each logits row's top tokens, the logits stay as they were."""

import numpy as np
import pytest
import quant_graphs as qg

from edgedec.errors import ConfigError
from edgedec.passes.base import PassError, create_pass


def test_graph_emits_the_top_tokens_of_every_row(model):
    result = create_pass("top-candidates", {"width": 5})(model)
    assert result.modified and result.report == {"output": "top_candidates", "width": 5}
    out = result.model.graph.output[-1]
    assert out.name == "top_candidates" and [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == \
        [1, "num_logits", 5]
    before, = qg.run(model, outputs=["logits"])
    logits, tops = qg.run(result.model, outputs=["logits", "top_candidates"])
    assert np.array_equal(logits, before)
    assert np.array_equal(tops[0], np.argsort(-logits[0], axis=-1, kind="stable")[:, :5])


def test_requires_the_logits_and_refuses_a_second_run(model):
    once = create_pass("top-candidates")(model).model
    with pytest.raises(PassError, match="the graph already emits top_candidates"):
        create_pass("top-candidates")(once)
    with pytest.raises(PassError, match="top-candidates reads the graph output `logits` and did not find it"):
        create_pass("top-candidates")(qg.no_matmul_graph())


def test_width_is_checked():
    with pytest.raises(ConfigError, match=r"top-candidates.width must be in 1..64, got 0"):
        create_pass("top-candidates", {"width": 0})
