"""edgedec check --target npu: the npu bundle passes; dynamic or contrib-op bundles fail with a report."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from edgedec.check import check_bundle
from edgedec.compiler import bundle_writer


def _make_dynamic(src, dst):
    """A copy of the npu bundle whose chunk dim is symbolic (what an NPU compiler cannot take)."""
    shutil.copytree(src, dst)
    path = dst / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for v in model.graph.input:
        if v.name in ("input_ids", "position_ids"):
            v.type.tensor_type.shape.dim[1].dim_param = "sequence"
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("files")
    for key in ("format", "format_version"):
        manifest.pop(key)
    bundle_writer.write_manifest(dst, manifest)
    return dst


def test_npu_bundle_passes_qnn(npu_bundle, cli):
    result = check_bundle(npu_bundle, "npu", "qnn")
    assert result.passed, result.violations[:5]
    r = cli("check", npu_bundle, "--target", "npu")
    assert r.exit_code == 0 and "PASS" in r.stdout


def test_dynamic_bundle_fails_with_report(npu_bundle, tmp_path, cli):
    bad = _make_dynamic(npu_bundle, tmp_path / "dyn")
    result = check_bundle(bad, "npu", "qnn")
    assert not result.passed
    inputs = [v for v in result.violations if v.node.startswith("input ")]
    assert {v.node for v in inputs} == {"input input_ids", "input position_ids"}
    assert all(v.rule == "static-shape" and "sequence" in v.reason and v.source for v in inputs)
    r = cli("check", bad, "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["passed"] is False and any(v["node"] == "input input_ids" for v in d["violations"])


def test_cpu_bundle_fails_on_contrib_ops_and_dynamic_dims(tiny_llama_bundle, cli):
    result = check_bundle(tiny_llama_bundle, "npu", "qnn")
    rules = {v.rule for v in result.violations}
    assert {"op", "static-shape", "quantized-weights", "dtype"} <= rules
    ops = {v.op for v in result.violations if v.rule == "op"}
    assert "com.microsoft:GroupQueryAttention" in ops
    r = cli("check", tiny_llama_bundle)
    assert r.exit_code == 1 and "FAIL" in r.stdout and "violations" in r.stdout


def test_nnapi_rules_refuse_16_bit_activations(npu_bundle):
    result = check_bundle(npu_bundle, "npu", "nnapi")
    assert not result.passed
    assert {v.rule for v in result.violations} == {"dtype"}
    assert all("uint16" in v.reason for v in result.violations)


def test_every_rule_cites_a_source():
    from edgedec.targets.npu_rules import RULE_SETS

    for r in RULE_SETS.values():
        assert r.ops_source and r.rank_source and r.dtype_source and r.static_shapes_source
        assert not r.quantized_weights or r.quantized_weights_source


@pytest.mark.parametrize("args, pattern", [
    (("--rules", "coreml"), "unknown rule set 'coreml'"),
    (("--target", "cpu"), "check has rules for targets npu"),
])
def test_bad_input_is_one_line(npu_bundle, cli, one_line_error, args, pattern):
    one_line_error(cli("check", npu_bundle, *args), pattern)


def test_not_a_bundle(tmp_path, cli, one_line_error):
    one_line_error(cli("check", tmp_path), "manifest.json is missing")
