"""One manifest validator: every reproducer of issue 21 (item 4) is refused at load with one line naming
the field, by ``Engine.load`` and by ``edgedec run``/``inspect`` (exit 2); valid bundles of every kind
still load; the JSON Schema in docs/ is the one the dataclasses generate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from edgedec.errors import BundleError
from edgedec.runtime import Bundle, Engine
from edgedec.runtime import manifest as mf

ROOT = Path(__file__).resolve().parents[2]


def edit(bundle: Path, change) -> None:
    """Apply ``change`` to the manifest (only manifest.json changes: the files' hashes stay valid)."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def at(*keys_and_value):
    """A change that sets manifest[k1][k2]... = value."""
    *keys, value = keys_and_value

    def change(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


def both(*changes):
    def change(m):
        for c in changes:
            c(m)
    return change


REPRODUCERS = [  # (id, change, the one line it must give)
    ("data-list-of-object", at("graphs", "decoder", "data", [{}]),
     r"^manifest: graphs\.decoder\.data\[0\] must be a string, got \{\}$"),
    ("data-float", at("graphs", "decoder", "data", 1.5), r"^manifest: graphs\.decoder\.data must be a list, got 1\.5$"),
    ("eos-float", at("tokenizer", "eos_token_ids", 1.5), r"^manifest: tokenizer\.eos_token_ids must be a list, got 1\.5$"),
    ("kv-dtype-object", at("kv_cache", "kv_dtype", {}),
     r"^manifest: kv_cache\.kv_dtype must be one of fp32, fp16, int8, int4, got \{\}$"),
    ("window-int", at("kv_cache", "window", 5), r"^manifest: kv_cache\.window must be an object or null, got 5$"),
    ("window-junk", at("kv_cache", "window", {"a": 1}), r"^manifest: kv_cache\.window\.sinks is missing$"),
    ("layers-float", at("kv_cache", "layers", 1.5), r"^manifest: kv_cache\.layers must be a list or null, got 1\.5$"),
    ("layers-strings", at("kv_cache", "layers", ["x", "y"]),
     r"^manifest: kv_cache\.layers\[0\] must be an object, got \"x\"$"),
    ("layer-kv-dtype-object", at("kv_cache", "layers", [{"kv_dtype": "fp32", "dtype": "float32"},
                                                        {"kv_dtype": {}, "dtype": "float32"}]),
     r"^manifest: kv_cache\.layers\[1\]\.kv_dtype must be one of fp32, fp16, int8, int4, got \{\}$"),
    ("head-dim-true", at("architecture", "head_dim", True), r"^manifest: architecture\.head_dim must be an integer, got true$"),
    ("kv-heads-negative", at("architecture", "num_kv_heads", -2),
     r"^manifest: architecture\.num_kv_heads must be >= 1, got -2$"),
    ("vocab-negative", at("architecture", "vocab_size", -300),
     r"^manifest: architecture\.vocab_size must be >= 1, got -300$"),
    ("layers-1e30", at("architecture", "num_layers", 10**30),
     r"^manifest: architecture\.num_layers must be <= 1,024, got 1000000000000000000000000000000$"),
    ("layers-2^40", at("architecture", "num_layers", 2**40), r"^manifest: architecture\.num_layers must be <= 1,024"),
    ("head-dim-16e12", at("architecture", "head_dim", 16 * 10**12), r"^manifest: architecture\.head_dim must be <= 1,024"),
    ("kv-too-large", both(at("architecture", "num_layers", 1024), at("kv_cache", "num_layers", 1024),
                          at("kv_cache", "max_capacity", 4_000_000)),
     r"^manifest: the KV cache would take [\d,.]+ GiB for 4,000,000 tokens, above the runtime's limit of 64 GiB"),
    ("passes-int", at("passes", 5), r"^manifest: passes must be a list, got 5$"),
    ("passes-list-of-int-with-speculation", both(at("passes", [5]), at("speculation", {"drafter": "ngram",
                                                                                         "draft_len": 4})),
     r"^manifest: passes\[0\] must be an object, got 5$"),
    ("speculation-list", at("speculation", [1]), r"^manifest: speculation must be an object or null, got \[1\]$"),
    ("drafter-list", at("speculation", {"drafter": ["x"]}), r"^manifest: speculation\.drafter must be a string, got \[\"x\"\]$"),
    ("drafter-unknown", at("speculation", {"drafter": "psychic"}),
     r"^manifest: speculation\.drafter is not a drafter this runtime knows, got \"psychic\"$"),
    ("draft-len-0", at("speculation", {"drafter": "ngram", "draft_len": 0}),
     r"^manifest: speculation\.draft_len must be >= 1, got 0$"),
    ("chat-template-int", at("tokenizer", "chat_template", 5),
     r"^manifest: tokenizer\.chat_template must be a string or null, got 5$"),
    ("chat-template-syntax", at("tokenizer", "chat_template", "{{ }}"),
     r"^manifest: tokenizer\.chat_template is not a valid Jinja template: .*\(line 1\)$"),
    ("num-layers-1", at("architecture", "num_layers", 1),
     r"^manifest: kv_cache\.num_layers must equal architecture\.num_layers \(1\), got 2$"),
    ("num-layers-1-everywhere", both(at("architecture", "num_layers", 1), at("kv_cache", "num_layers", 1)),
     r"^manifest: graphs\.decoder\.inputs declare past_key\.0 \.\. past_key\.1 for 2 layers; "
     r"architecture\.num_layers is 1$"),
    ("vocab-vs-logits", at("architecture", "vocab_size", 100),
     r"^manifest: graphs\.decoder\.outputs\[0\]\.shape must end in vocab_size \(100\)"),
    ("kv-heads-vs-graph", both(at("architecture", "num_kv_heads", 4), at("kv_cache", "kv_heads", 4)),
     r"^manifest: graphs\.decoder\.inputs\[\d+\]\.shape\[1\] must be 4 \(num_kv_heads\), got 2$"),
    ("format-version-true", at("format_version", True), r"^manifest: format_version must be an integer, got true$"),
    ("format-version-float", at("format_version", 1.0), r"^manifest: format_version must be an integer, got 1\.0$"),
    ("eos-out-of-vocab", at("tokenizer", "eos_token_ids", [10**6]),
     r"^manifest: tokenizer\.eos_token_ids\[0\] must be < vocab_size \(384\), got 1000000$"),
    ("sha-not-hex", at("files", "tokenizer.json", "sha256", "zz"),
     r"^manifest: files\.tokenizer\.json\.sha256 must match"),
]


@pytest.mark.parametrize("change, message", [r[1:] for r in REPRODUCERS], ids=[r[0] for r in REPRODUCERS])
def test_reproducer_is_refused_in_one_line(bundle_copy, change, message, cli, one_line_error):
    edit(bundle_copy, change)
    with pytest.raises(BundleError, match=message) as info:
        Engine.load(bundle_copy, threads=1)
    assert "\n" not in str(info.value)
    one_line_error(cli("run", bundle_copy, "-p", "hi", "-n", "2", "--threads", "1"), message[1:])
    one_line_error(cli("inspect", bundle_copy), message[1:])


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000, r"nests deeper than 64 levels"),
    ("[" * 50 + "]" * 50, r"manifest\.json is not an edgedec manifest"),
    ('{"format": "edgedec-bundle", "format": "x"}', r"has the key \"format\" twice in one object"),
    ('{"format": NaN}', r"is not valid JSON: NaN is not a JSON number"),
    ('{"n": ' + "9" * 5000 + "}", r"is not valid JSON"),
    ("\xff\xfe", r"is not valid JSON"),
], ids=["100k-brackets", "50-brackets", "duplicate-key", "nan", "5000-digits", "not-utf8"])
def test_malformed_json_is_refused(bundle_copy, text, message, cli, one_line_error):
    (bundle_copy / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)
    one_line_error(cli("inspect", bundle_copy), message)


def test_huge_manifest_is_refused_unread(bundle_copy, monkeypatch):
    monkeypatch.setattr("edgedec.runtime.bundle.MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(BundleError, match=r"has [\d,]+ bytes, more than a manifest may \(1,000\)"):
        Bundle.open(bundle_copy)


def test_inspect_takes_a_manifest_without_its_optional_keys(bundle_copy, cli):
    def strip(m):
        for key in ("verification", "speculation", "edgedec_version", "created", "timings"):
            m.pop(key, None)
        m["source"] = {}
        for key in list(m["architecture"]):
            if key not in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
                del m["architecture"][key]
        m["kv_cache"] = {k: v for k, v in m["kv_cache"].items() if k == "max_capacity"}
        m["passes"] = [{"pass": p["pass"]} for p in m["passes"]]
        m["tokenizer"] = {"file": m["tokenizer"]["file"]}
        m["target"] = {"name": "cpu", "backend": "onnxruntime"}
        for g in m["graphs"].values():
            for key in ("execution_provider", "data"):
                g.pop(key, None)
            g["data"] = ["decoder.onnx.data"]
    edit(bundle_copy, strip)
    r = cli("inspect", bundle_copy)
    assert r.exit_code == 0, r.stderr
    assert "bundle valid" in r.stdout
    engine = Engine.load(bundle_copy, threads=1)  # and it still runs
    assert len(engine.generate_text("def f(x):", max_new_tokens=3, ignore_eos=True)) > 0


def test_unknown_keys_are_informational(bundle_copy):
    edit(bundle_copy, both(at("comment", "from a newer edgedec"), at("architecture", "sliding", {"x": 1})))
    Engine.load(bundle_copy, threads=1)


def test_session_is_held_to_the_declared_graph(bundle_copy):
    """A manifest that declares a graph other than the real one (rehashed by hand) is refused before any
    buffer is bound: here the declared logits width matches a lying architecture."""
    def lie(m):
        m["graphs"]["decoder"]["inputs"] = [i for i in m["graphs"]["decoder"]["inputs"] if i["name"] != "seqlens_k"]
    edit(bundle_copy, lie)
    with pytest.raises(BundleError, match=r"decoder\.onnx has inputs the manifest does not declare: seqlens_k"):
        Engine.load(bundle_copy, threads=1)


def test_the_kv_cache_must_fit_the_machine(bundle_copy, monkeypatch):
    monkeypatch.setattr("edgedec.runtime.engine.available_memory", lambda: 4096)
    with pytest.raises(Exception, match=r"a KV cache of 256 tokens takes .* more than this machine's"):
        Engine.load(bundle_copy, threads=1)


# ---------------------------------------------------------------------------------------------
# valid bundles of every kind the suite builds are never refused
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kinds(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama compiled as each kind of bundle (compile itself opens what it wrote)."""
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    base = tmp_path_factory.mktemp("kinds")
    options = {
        "int4-spec": CompileOptions(passes=(("int4", {}),), spec="ngram"),
        "kv-int8": CompileOptions(kv="int8"),
        "kv-int4-mixed": CompileOptions(passes=(("kv-cache", (("dtype", "int4"), ("int8_layers", 1))),)),
        "window-int4": CompileOptions(kv="int4", kv_window=32, kv_sinks=4),
        "recycling": CompileOptions(spec="ngram+recycling"),
        "npu": CompileOptions(target="npu", max_context=64, chunk=8,
                              passes=(("qdq", (("samples", 2), ("sequence_length", 16))),)),
        "gpu": CompileOptions(target="gpu", max_context=64),
    }
    out = {}
    for name, o in options.items():
        out[name] = compile_model(str(tiny_llama_dir), base / name, o) and base / name
    return out


def test_every_kind_of_bundle_is_valid(kinds):
    for name, path in kinds.items():
        b = Bundle.open(path)
        assert b.info.kv_bytes_per_token() == b.manifest["kv_cache"]["bytes_per_token"], name
        if name != "gpu":  # no CUDA here: the gpu bundle validates but does not run
            engine = Engine.load(path, threads=1)
            assert engine.generate_text("def f(x):", max_new_tokens=3, ignore_eos=True) is not None


def test_cpu_tvm_bundle_is_valid(tiny_llama_dir, tmp_path):
    pytest.importorskip("tvm")
    from edgedec.compiler.pipeline import CompileOptions, compile_model

    compile_model(str(tiny_llama_dir), tmp_path / "b", CompileOptions(target="cpu-tvm", max_context=32))
    b = Bundle.open(tmp_path / "b")
    assert b.info.decoder().format == "tvm-relax-vm"
    for change, message in (
        (at("architecture", "num_layers", 1), r"kv_cache\.num_layers must equal"),
        (both(at("architecture", "num_layers", 1), at("kv_cache", "num_layers", 1)),
         r"graphs\.decoder\.params hold layers 0\.\.1; architecture\.num_layers is 1"),
        (at("architecture", "vocab_size", 100), r"params\[0\]\.shape does not fit architecture\.vocab_size = 100"),
        (at("kv_cache", "dtype", "int8"), r"kv_cache\.dtype must be int8|kv_cache\.dtype must be float32"),
    ):
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        shutil.copytree(tmp_path / "b", tmp_path / "c")
        edit(tmp_path / "c", change)
        with pytest.raises(BundleError, match=message):
            Bundle.open(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# the JSON Schema
# ---------------------------------------------------------------------------------------------
def test_schema_file_is_generated_from_the_dataclasses():
    on_disk = json.loads((ROOT / "docs" / "bundle.schema.json").read_text())
    assert on_disk == json.loads(json.dumps(mf.json_schema())), \
        "docs/bundle.schema.json is stale: python -m edgedec.runtime.manifest > docs/bundle.schema.json"


def test_schema_names_every_dataclass_field():
    schema = mf.json_schema()
    sections = {"Manifest": schema, **schema["$defs"]}

    def walk(tp, seen):
        if dataclasses.is_dataclass(tp) and tp.__name__ not in seen:
            seen.add(tp.__name__)
            props = sections[tp.__name__]["properties"]
            for f in dataclasses.fields(tp):
                key = mf.JSON_KEYS.get(f.name, f.name) if tp is mf.PassEntry else f.name
                assert key in props, (tp.__name__, key)
                assert props[key]["description"], (tp.__name__, key)
                walk(typing.get_type_hints(tp)[f.name], seen)
        for a in typing.get_args(tp):
            walk(a, seen)

    seen: set = set()
    walk(mf.Manifest, seen)
    walk(mf.FfnSkipSection, seen)
    assert seen == set(sections), set(sections) ^ seen


def test_schema_accepts_what_compile_writes_and_refuses_a_reproducer(tiny_llama_bundle):
    jsonschema = pytest.importorskip("jsonschema")
    m = json.loads((tiny_llama_bundle / "manifest.json").read_text())
    jsonschema.validate(m, mf.json_schema())
    m["architecture"]["head_dim"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, mf.json_schema())


def test_format_doc_lists_the_fields_as_generated():
    doc = (ROOT / "docs" / "bundle-format.md").read_text()
    start = doc.index("<!-- generated: python -m edgedec.runtime.manifest --markdown -->\n")
    block = doc[start:].split("\n", 1)[1].split("<!-- end generated -->")[0]
    assert block.strip() == mf.fields_markdown().strip(), \
        "docs/bundle-format.md is stale: regenerate its Fields section with python -m edgedec.runtime.manifest --markdown"
