"""Fixtures shared by the quantization pass tests: the small decoder of quant_graphs and its float outputs."""

import pytest
import quant_graphs as qg


@pytest.fixture(scope="module")
def model():
    return qg.decoder_graph(expose_embedding=True)


@pytest.fixture(scope="module")
def reference(model):
    return qg.run(model)
