"""KV-cache layouts (compile --kv fp16/int8/int4) and the sink + sliding window, on the tiny Llama/Qwen2.

References: the fp32-KV bundle of the same model (logits, its float cache), and the layout the manifest
documents (what the kernel must have stored, re-derived in numpy from the fp32 cache and the scales).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgedec.compiler.pipeline import CompileOptions, compile_model
from edgedec.errors import ConfigError
from edgedec.passes.kv_cache import dequantize, quantize
from edgedec.runtime import Engine
from edgedec.runtime.kv_cache import hadamard

_built: dict = {}


@pytest.fixture(scope="module")
def prompt(tiny) -> list[int]:
    """60 tokens of English prose (not the calibration text) in the tiny model's tokenizer."""
    from tokenizers import Tokenizer

    from _tiny import sample_text

    ids = Tokenizer.from_file(str(tiny["dir"] / "tokenizer.json")).encode(sample_text("while")).ids
    assert len(ids) >= 60
    return ids[:60]


MIXED = "int4+int8"  # an int4 cache with one of the two layers kept int8 (the one int4 costs most)


def _bundle(tmp_path_factory, tiny: dict, kv: str, window: int | None = None, sinks: int = 4) -> Path:
    key = (tiny["name"], kv, window, sinks)
    if key not in _built:
        out = tmp_path_factory.mktemp(f"kv-{tiny['name']}-{kv}-{window}") / "bundle"
        if kv == MIXED:
            options = CompileOptions(passes=(("kv-cache", (("dtype", "int4"), ("int8_layers", 1))),),
                                     kv_window=window, kv_sinks=sinks)
        else:
            options = CompileOptions(kv=kv, kv_window=window, kv_sinks=sinks)
        compile_model(str(tiny["dir"]), out, options)
        _built[key] = out
    return _built[key]


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _teacher_forced(bundle: Path, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of the prompt's last position and of each decode step fed ``tokens``: (1 + steps, vocab)."""
    dec = Engine.load(bundle, threads=1).decoder
    rows = [dec.forward(prompt)[-1].copy()]
    for t in tokens:
        rows.append(dec.decode_one(t).copy())
    return np.array(rows)


@pytest.fixture(scope="module")
def reference(tiny, prompt):
    """The fp32-KV bundle's greedy continuation of the prompt and its logits along it."""
    dec = Engine.load(tiny["bundle"], threads=1).decoder
    rows = [dec.forward(prompt)[-1].copy()]
    tokens = []
    for _ in range(40):
        tokens.append(int(rows[-1].argmax()))
        rows.append(dec.decode_one(tokens[-1]).copy())
    return tokens, np.array(rows)


# --- manifest and sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("kv,dtype,row,per_token", [("fp16", "float16", 16, 256), ("int8", "int8", 16, 128),
                                                   ("int4", "uint8", 8, 64)])
def test_manifest_describes_layout(tmp_path_factory, tiny, kv, dtype, row, per_token):
    bundle = _bundle(tmp_path_factory, tiny, kv)
    m = _manifest(bundle)
    c = m["kv_cache"]
    # 2 layers x (K, V) x 2 kv heads x head_dim 16; fp32 is 512 bytes per token
    assert (c["kv_dtype"], c["dtype"], c["row_elements"], c["bytes_per_token"]) == (kv, dtype, row, per_token)
    assert _manifest(tiny["bundle"])["kv_cache"]["bytes_per_token"] == 512
    inputs = {v["name"]: v for v in m["graphs"]["decoder"]["inputs"]}
    assert inputs["past_key.1"]["dtype"] == dtype and inputs["past_key.1"]["shape"] == [1, 2, "capacity", row]
    assert c["window"] is None
    q = c["quantization"]
    if kv == "fp16":
        assert q is None and "kv_scales.f32" not in m["files"]
        return
    assert q["bits"] == (8 if kv == "int8" else 4) and q["zero_point"] == (0 if kv == "int8" else 8)
    assert q["key"]["scheme"] == q["value"]["scheme"] == "per_channel"
    assert q["key"]["scale_tensor"] == "kv_scale.key.{layer}" and q["key"]["scale_shape"] == [1, 2, 1, 16]
    assert m["files"][q["scales_file"]]["bytes"] == 2 * 2 * 2 * 16 * 4
    assert q["calibration"]["tokens"] > 0
    assert q["calibration"].get("key_positions") == (None if kv == "int8" else m["kv_cache"]["max_capacity"])
    assert q["clip"] == ("none" if kv == "int8" else "mse")  # int4 shrinks value ranges to the least-error clip
    # int8 clips nothing; int4's Hadamard-rotated keys take the least-error clip too
    assert q["key"]["clip"] == ("none" if kv == "int8" else "mse")
    assert q["key"]["range"] == ("pair" if kv == "int8" else "positions")
    if kv == "int4":  # centred, rotated keys: offsets in the bundle, one per layer, kv head and channel
        assert "offset" in q["key"] and m["files"][q["key_offsets_file"]]["bytes"] == 2 * 2 * 16 * 4
        assert q["key"]["rotation"]["kind"] == q["key_rotation"]["kind"] == "hadamard"
        assert c["static_bytes"] == (2 * 2 * 2 * 16 + 2 * 2 * 16) * 4
    else:
        assert "offset" not in q["key"] and "key_offsets_file" not in q
    assert kv == "int8" or 0.3 <= q["mean_clip_fraction"]["value"] <= 1
    assert 0 < q["key"]["relative_rms_error"]["max"] < (0.05 if kv == "int8" else 0.5)
    pass_log = [p for p in m["passes"] if p["pass"] == "kv-cache"]
    assert len(pass_log) == 1 and pass_log[0]["modified"] and pass_log[0]["config"]["dtype"] == kv


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_kernel_stores_the_documented_layout(tmp_path_factory, tiny, prompt, kv):
    """Layer 0's keys and values depend on the tokens alone, so the quantized bundle must hold exactly
    quantize(fp32 cache, scales) as the manifest's formula and scales file say."""
    bundle = _bundle(tmp_path_factory, tiny, kv)
    m = _manifest(bundle)
    ref = Engine.load(tiny["bundle"], threads=1).decoder
    ref.forward(prompt)
    dec = Engine.load(bundle, threads=1).decoder
    dec.forward(prompt)
    q = m["kv_cache"]["quantization"]
    scales = np.fromfile(bundle / q["scales_file"], "<f4").reshape(2, 2, 2, 16)
    offsets = np.zeros((2, 2, 16), np.float32)  # int4 stores (rotary(key) - offset) @ H
    if "key_offsets_file" in q:
        offsets = np.fromfile(bundle / q["key_offsets_file"], "<f4").reshape(2, 2, 16)
        assert np.abs(offsets[0]).max() > 0
    rotation = np.eye(16, dtype=np.float32)
    if kv == "int4":
        assert q["key_rotation"]["kind"] == "hadamard" and q["key_rotation"]["order"] == 16
        rotation = hadamard(16)
    else:
        assert "key_rotation" not in q
    n = len(prompt)
    for j in (0, 1):  # keys (post-rotary), values
        x = ref.kv.buffer[0, j, 0, :, :n]  # (kv_heads, n, head_dim)
        if j == 0:
            x = (x - offsets[0][:, None, :]) @ rotation
        s = scales[0, j][:, None, :]
        stored = dec.kv.buffer[0, j, 0, :, :n]
        assert stored.dtype == (np.int8 if kv == "int8" else np.uint8)
        assert (quantize(x, s, kv) == stored).mean() > 0.999
        err = np.sqrt(((dequantize(stored, s, kv) - x) ** 2).mean() / (x ** 2).mean())
        assert err < (0.02 if kv == "int8" else 0.2)


def _run_two_steps(model, prompt: list[int]) -> list[dict]:
    """A prefill of prompt[:-3] over an empty cache, then a 3-token step over that cache: each step's outputs."""
    import onnxruntime as ort

    from edgedec.passes.qdq import prefill_feed

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: (i.shape[1], i.shape[3], np.float32) for i in sess.get_inputs() if i.name.startswith("past_")}
    n = len(prompt) - 3
    first = dict(zip(names, sess.run(None, prefill_feed(prompt[:n], past, True))))
    feed = {"input_ids": np.asarray(prompt[n:], np.int64)[None], "seqlens_k": np.array([n + 2], np.int32),
            "total_sequence_length": np.array(n + 3, np.int32), "logits_index": np.arange(3, dtype=np.int64)}
    for name in past:
        buf = np.zeros(first["present" + name[4:]].shape[:2] + (n + 3,) + first["present" + name[4:]].shape[3:],
                       np.float32)
        buf[:, :, :n] = first["present" + name[4:]][:, :, :n]
        feed[name] = buf
    return [first, dict(zip(names, sess.run(None, feed)))]


@pytest.mark.parametrize("fold", [True, False])
def test_centring_keys_leaves_attention_unchanged(tiny, prompt, fold):
    """Centred keys (int4's default) are exact in float: with any offsets, a float-cache graph stores
    rotary(key) - offset and its logits do not move, in a prefill and in a step over a filled cache."""
    import onnx

    from edgedec.passes.kv_cache import _attention_nodes, _center_keys

    model = onnx.load(str(tiny["bundle"] / "decoder.onnx"))
    centred = onnx.ModelProto()
    centred.CopyFrom(model)
    nodes = _attention_nodes(centred)
    rng = np.random.default_rng(0)
    offsets = {l: rng.normal(0, 3, (2, 16)).astype(np.float32) for l in nodes}
    _center_keys(centred, nodes, offsets, fold)
    ops = [n.op_type for n in centred.graph.node]
    # folded: the projection's MatMul takes the shift in (two Concats); else a MatMul and an Add per layer
    added = {"MatMul": 0 if fold else len(nodes), "Concat": 1 + (2 * len(nodes) if fold else 0)}
    for op, count in added.items():
        assert ops.count(op) - [n.op_type for n in model.graph.node].count(op) == count
    for want, got in zip(_run_two_steps(model, prompt[:24]), _run_two_steps(centred, prompt[:24])):
        scale = np.abs(want["logits"]).max()
        assert np.abs(got["logits"] - want["logits"]).max() < 1e-4 * scale
        for l, offset in offsets.items():
            filled = want["present_key.0"].shape[2]
            assert np.allclose(got[f"present_key.{l}"][0, :, :filled], want[f"present_key.{l}"][0, :, :filled]
                               - offset[:, None, :], atol=1e-4)
            assert np.allclose(got[f"present_value.{l}"], want[f"present_value.{l}"], atol=1e-5)


def test_rotating_keys_leaves_attention_unchanged(tiny, prompt):
    """Hadamard-rotated keys (int4's default) are exact in float: rotary moves out of the attention, queries
    and keys are multiplied by H, keys lose an offset; logits do not move and the cache holds
    rotary(key) @ H - offset, in a prefill and in a step over a filled cache."""
    import onnx

    from edgedec.passes.kv_cache import _attention_nodes, _rotate_keys, _shift_rotated_keys

    model = onnx.load(str(tiny["bundle"] / "decoder.onnx"))
    rotated = onnx.ModelProto()
    rotated.CopyFrom(model)
    nodes = _attention_nodes(rotated)
    _rotate_keys(rotated, nodes)
    rng = np.random.default_rng(0)
    offsets = {l: rng.normal(0, 3, (2, 16)).astype(np.float32) for l in nodes}
    _shift_rotated_keys(rotated, offsets)
    assert all(next(a.i for a in n.attribute if a.name == "do_rotary") == 0 for n in nodes.values())
    h = hadamard(16)
    for want, got in zip(_run_two_steps(model, prompt[:24]), _run_two_steps(rotated, prompt[:24])):
        scale = np.abs(want["logits"]).max()
        assert np.abs(got["logits"] - want["logits"]).max() < 1e-4 * scale
        for l, offset in offsets.items():
            filled = want["present_key.0"].shape[2]
            assert np.allclose(got[f"present_key.{l}"][0, :, :filled],
                               want[f"present_key.{l}"][0, :, :filled] @ h - offset[:, None, :], atol=1e-4)
            assert np.allclose(got[f"present_value.{l}"], want[f"present_value.{l}"], atol=1e-5)


@pytest.mark.parametrize("k_rotate", ["off", "on"])
def test_repositioned_keys_keep_their_content_at_new_positions(tiny, prompt, tmp_path, k_rotate):
    """int4 key ranges come from the calibration keys rotated to positions across the whole context:
    each rotary pair keeps its norm, and rotating back by the new position gives the unrotated key.
    Rotated keys (stored times H) come in and go out times H."""
    import onnx
    from onnx import numpy_helper

    from edgedec.passes.kv_cache import KvCacheConfig, KvCachePass, _attention_nodes

    model = onnx.load(str(tiny["bundle"] / "decoder.onnx"))
    nodes = _attention_nodes(model)
    path = tmp_path / "g.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    inits = {i.name: numpy_helper.to_array(i, str(tmp_path)) for i in model.graph.initializer}
    cos, sin = inits[nodes[0].input[7]], inits[nodes[0].input[8]]
    n, half = 20, 8
    rng = np.random.default_rng(1)
    pre = rng.normal(size=(2, n, 16)).astype(np.float32)  # (kv_heads, n, head_dim) before rotary

    def rotate(x, c, s):
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    written = rotate(pre, cos[:n], sin[:n])  # what the graph stores at positions 0..n-1
    h = hadamard(16) if k_rotate == "on" else np.eye(16, dtype=np.float32)
    moved, positions = KvCachePass(KvCacheConfig(dtype="int4", k_rotate=k_rotate))._reposition(
        path, model, nodes, {0: [written @ h]}, n)
    moved = moved[0][0] @ h
    assert positions == cos.shape[0]  # the graph's whole context
    norm = lambda x: np.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
    assert np.allclose(norm(moved), norm(pre), atol=1e-4)
    assert np.abs(moved - written).max() > 0.1  # they did move
    # each moved key is the unrotated one at some position of the context
    for t in range(n):
        errs = [np.abs(rotate(pre[:, t], cos[p], sin[p]) - moved[:, t]).max() for p in range(cos.shape[0])]
        assert min(errs) < 1e-4


def test_fp16_matches_fp32(tmp_path_factory, tiny, prompt, reference):
    tokens, ref = reference
    got = _teacher_forced(_bundle(tmp_path_factory, tiny, "fp16"), prompt, tokens)
    assert np.abs(got - ref).max() < 1e-2 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("kv,min_agree,max_err", [("int8", 0.6, 0.3), ("int4", 0.2, 0.8)])
def test_quantized_close_to_fp32(tmp_path_factory, tiny, prompt, reference, kv, min_agree, max_err):
    """The tiny random models amplify cache error (init range 0.2): loose bounds, checked along 40
    decode steps fed the fp32 bundle's greedy tokens; SmolLM2's perplexity is the quality figure."""
    tokens, ref = reference
    got = _teacher_forced(_bundle(tmp_path_factory, tiny, kv), prompt, tokens)
    assert not np.array_equal(got, ref)  # the quantized path really ran
    rel = np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean())
    assert rel < max_err
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= min_agree


def test_mixed_int4_keeps_the_costliest_layer_int8(tmp_path_factory, tiny, prompt, reference):
    """int4 with int8_layers=1: the layer whose int4 cache moves the logits most (measured KL) stays int8,
    the manifest describes each layer's layout, and each layer's buffer holds what the formula says."""
    bundle = _bundle(tmp_path_factory, tiny, MIXED)
    m = _manifest(bundle)
    c = m["kv_cache"]
    report = next(p["report"] for p in m["passes"] if p["pass"] == "kv-cache")
    kl = report["sensitivity"]["kl"]
    assert len(kl) == 2 and min(kl) >= 0 and max(kl) > 0
    int8_layer = int(np.argmax(kl))
    kinds = ["int8" if l == int8_layer else "int4" for l in range(2)]
    assert [e["kv_dtype"] for e in c["layers"]] == kinds == report["layer_dtypes"]
    assert [e["row_elements"] for e in c["layers"]] == [16 if k == "int8" else 8 for k in kinds]
    assert c["bytes_per_token"] == 128 // 2 + 64 // 2  # one int8 layer, one int4 layer (of 2)
    assert c["quantization"]["int8_layers"]["layers"] == [int8_layer]
    inputs = {v["name"]: v for v in m["graphs"]["decoder"]["inputs"]}
    for l, kind in enumerate(kinds):
        assert inputs[f"past_value.{l}"]["dtype"] == ("int8" if kind == "int8" else "uint8")
    # layer 0 depends on the tokens alone: its buffer is quantize(fp32 cache, scales) in its own layout
    ref = Engine.load(tiny["bundle"], threads=1).decoder
    ref.forward(prompt)
    dec = Engine.load(bundle, threads=1).decoder
    dec.forward(prompt)
    scales = np.fromfile(bundle / c["quantization"]["scales_file"], "<f4").reshape(2, 2, 2, 16)
    offsets = np.fromfile(bundle / c["quantization"]["key_offsets_file"], "<f4").reshape(2, 2, 16)  # every layer
    n = len(prompt)
    assert dec.kv.nbytes == c["bytes_per_token"] * dec.kv.capacity
    for j in (0, 1):  # every layer's keys are rotated: (rotary(key) - offset) @ H
        x = ref.kv.layers[0][j, 0, :, :n]
        if j == 0:
            x = (x - offsets[0][:, None, :]) @ hadamard(16)
        stored = dec.kv.layers[0][j, 0, :, :n]
        assert (quantize(x, scales[0, j][:, None, :], kinds[0]) == stored).mean() > 0.999
    # and the whole model stays close to the float cache
    tokens, logits = reference
    got = _teacher_forced(bundle, prompt, tokens)
    assert (got.argmax(-1) == logits.argmax(-1)).mean() >= 0.2
    assert np.sqrt(((got - logits) ** 2).mean() / (logits ** 2).mean()) < 0.8  # as test_quantized_close_to_fp32


def test_inspect_names_each_layers_layout_and_centred_keys(cli, tmp_path_factory, tiny):
    bundle = _bundle(tmp_path_factory, tiny, MIXED)
    int8_layer = _manifest(bundle)["kv_cache"]["quantization"]["int8_layers"]["layers"][0]
    result = cli("inspect", bundle)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert f"kv cache layers: int4 [{1 - int8_layer}], int8 [{int8_layer}]; 96 bytes per token" in text
    assert ("kv cache keys: centred (stored minus their calibrated mean, kv_key_offsets.f32), rotated by a "
            "hadamard matrix of order 16") in text
    plain = " ".join(cli("inspect", _bundle(tmp_path_factory, tiny, "int8")).stdout.split())
    assert "kv cache keys" not in plain and "kv cache layers" not in plain


def test_int8_layers_option_is_checked(tiny, tmp_path):
    with pytest.raises(ConfigError, match="int8_layers mixes int8 layers into an int4 cache; dtype is int8"):
        compile_model(str(tiny["dir"]), tmp_path / "c",
                      CompileOptions(passes=(("kv-cache", (("dtype", "int8"), ("int8_layers", 1))),)))
    from edgedec.passes.base import PassError

    with pytest.raises(PassError, match="int8_layers is 3, but the graph has 2 layers"):
        compile_model(str(tiny["dir"]), tmp_path / "c",
                      CompileOptions(passes=(("kv-cache", (("dtype", "int4"), ("int8_layers", 3))),)))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("options,message", [
    ((("dtype", "fp16"), ("k_rotate", "on")), "k_rotate rotates quantized keys; dtype is fp16"),
    ((("dtype", "int4"), ("k_rotate", "on"), ("k_range", "pair")), "k_range=pair bounds rotary channel pairs"),
    ((("dtype", "int4"), ("k_rotate", "sideways")), "k_rotate must be one of auto, on, off"),
])
def test_k_rotate_option_is_checked(tiny, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        compile_model(str(tiny["dir"]), tmp_path / "c", CompileOptions(passes=(("kv-cache", options),)))
    assert not (tmp_path / "c").exists()


# --- sink + sliding window -----------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["fp32", "int8", MIXED])
def test_window_generates_far_past_the_window_in_constant_memory(tmp_path_factory, tiny, prompt, kv):
    bundle = _bundle(tmp_path_factory, tiny, kv, window=32, sinks=4)
    w = _manifest(bundle)["kv_cache"]["window"]
    assert (w["sinks"], w["window"], w["capacity"], w["evict_chunk"]) == (4, 32, 36, 4)
    assert len(w["rotary_inv_freq"]) == 8
    q = _manifest(bundle)["kv_cache"]["quantization"]
    if kv == MIXED:  # int4 key ranges for the slots keys are ever written at, not the whole context
        assert q["calibration"]["key_positions"] == 36
    engine = Engine.load(bundle, threads=1)
    kv_cache = engine.decoder.kv
    buffer, nbytes = kv_cache.buffer, kv_cache.nbytes
    assert kv_cache.capacity == 36 and engine.context_length == 36
    out = list(engine.generate(prompt[:10], max_new_tokens=360, ignore_eos=True, drafter=None))
    assert len(out) == 360 and engine.last_stats.stop_reason == "length"
    assert kv_cache.buffer is buffer and kv_cache.nbytes == nbytes  # one buffer, never reallocated
    assert kv_cache.evicted >= 360 + 10 - 36 and kv_cache.length <= 36
    # speculation rolls back inside the window too
    spec = list(engine.generate(prompt[:10], max_new_tokens=200, ignore_eos=True, drafter="ngram",
                                adaptive_draft=False))
    assert [t.id for t in spec] == [t.id for t in out[:200]]
    stats = engine.last_stats  # drafts were verified (so rolled back where rejected), not plain decoding
    assert stats.verify_steps > 0 and stats.drafted_tokens > 0


def test_window_equals_plain_cache_until_full(tmp_path_factory, tiny, prompt, reference):
    tokens, ref = reference
    bundle = _bundle(tmp_path_factory, tiny, "fp32", window=128, sinks=4)  # 60 + 40 < 132: no eviction
    got = _teacher_forced(bundle, prompt, tokens)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("kv,tol", [("fp32", 1e-4), ("int8", None), ("int4", None)])
def test_evicted_cache_holds_keys_at_their_slot_positions(tmp_path_factory, tiny, prompt, kv, tol):
    """After an eviction the kept tokens sit at new slots with keys rotated for those slots: layer 0's
    cache must equal that of a fresh prefill of just the kept tokens (layer 0 depends on tokens only)."""
    bundle = _bundle(tmp_path_factory, tiny, kv, window=32, sinks=4)
    dec = Engine.load(bundle, threads=1).decoder
    ids = prompt[:36]
    dec.forward(ids)  # the cache is full
    dec.decode_one(7)  # evicts 4 tokens after the sinks, then writes token 7
    assert dec.kv.length == 33 and dec.kv.evicted == 4
    kept = ids[:4] + ids[8:] + [7]
    fresh = Engine.load(bundle, threads=1).decoder
    fresh.forward(kept)
    a, b = dec.kv.buffer[0, :, 0, :, :33], fresh.kv.buffer[0, :, 0, :, :33]
    if kv == "int4":  # compare elements, not the bytes that pack two of them
        a, b = (np.stack([x & 15, x >> 4], axis=-1) for x in (a, b))
    if tol is not None:
        assert np.abs(a - b).max() < tol
    else:  # requantized after rotation: within one step of the grid, but where the calibrated range
        # clipped a key, rotation moves the clipped part (int4: centred keys rotated by H, clipped to the
        # least-error range; the runtime undoes H and the offset before rotating and redoes them after)
        near = np.abs(a.astype(int) - b.astype(int)) <= 1
        assert near.mean() > 0.995 and (a == b).mean() > 0.85
        assert np.array_equal(a[1], b[1])  # values are shifted, not requantized


# --- errors ------------------------------------------------------------------------------------
def test_invalid_layouts_are_refused(cli, one_line_error, tiny, tmp_path):
    result = cli("compile", str(tiny["dir"]), "-o", str(tmp_path / "b"), "--kv", "int3")
    one_line_error(result, r"kv must be one of fp32, fp16, int8, int4, got 'int3'")
    result = cli("compile", str(tiny["dir"]), "-o", str(tmp_path / "b"), "--kv-window", "8")
    one_line_error(result, r"kv_window must be >= 16")
    result = cli("compile", str(tiny["dir"]), "-o", str(tmp_path / "b"), "--kv-window", "60", "--max-context", "32")
    one_line_error(result, r"kv_sinks \+ kv_window = 64 exceeds the bundle's 32 positions")
    result = cli("compile", str(tiny["dir"]), "-o", str(tmp_path / "b"), "--kv-window", "64", "--target", "gpu")
    one_line_error(result, r"target gpu cannot run a sink \+ sliding window \(--kv-window\)")
    result = cli("compile", str(tiny["dir"]), "-o", str(tmp_path / "b"), "--kv-window", "300")  # known after loading
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: kv_sinks + kv_window = 304 exceeds the bundle's 256 "
                                                      "positions (raise --max-context or shrink the window)")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="kv-cache.k_scale must be one of per_channel, per_tensor, got 'per_token'"):
        compile_model(str(tiny["dir"]), tmp_path / "c",
                      CompileOptions(passes=(("kv-cache", (("dtype", "int8"), ("k_scale", "per_token"))),)))
    with pytest.raises(ConfigError, match="give the KV-cache layout once"):
        compile_model(str(tiny["dir"]), tmp_path / "c", CompileOptions(kv="int8", passes=(("kv-cache", ()),)))
    assert not (tmp_path / "c").exists()


def test_bench_reports_kv_bytes_and_context(tmp_path_factory, tiny):
    from edgedec.bench import BenchOptions, measure

    bundle = _bundle(tmp_path_factory, tiny, "int8")
    b = measure(bundle, ["def f(x):"], BenchOptions(warmup=0, runs=1, new_tokens=4, context_tokens=100, threads=1))
    assert b.kv_bytes_per_token == 128
    assert b.prompt_tokens == 100 and b.new_tokens == 4
    assert b.kv_cache_bytes == 2 * 2 * 2 * 105 * 16  # capacity = context + new tokens + 1


def test_runtime_refuses_a_bad_per_layer_layout(tmp_path_factory, tiny):
    """The manifest's kv_cache.layers must name one known layout per layer."""
    import copy
    from types import SimpleNamespace

    from edgedec.errors import BundleError
    from edgedec.runtime.kv_cache import KVCache

    m = _manifest(_bundle(tmp_path_factory, tiny, MIXED))
    good = SimpleNamespace(manifest=m, arch=m["architecture"])
    kv = KVCache.from_manifest(good, 64)
    assert [layer.dtype for layer in kv.layers] == [np.int8 if e["kv_dtype"] == "int8" else np.uint8
                                                     for e in m["kv_cache"]["layers"]]
    short = copy.deepcopy(m)
    short["kv_cache"]["layers"] = short["kv_cache"]["layers"][:1]
    with pytest.raises(BundleError, match="kv_cache.layers has 1 entries for 2 layers"):
        KVCache.from_manifest(SimpleNamespace(manifest=short, arch=good.arch), 64)
    wrong = copy.deepcopy(m)
    wrong["kv_cache"]["layers"][0]["dtype"] = "float32"
    with pytest.raises(BundleError, match="is not one this runtime knows"):
        KVCache.from_manifest(SimpleNamespace(manifest=wrong, arch=good.arch), 64)
