"""The draft head's step time with and without VocabTrim, in one run.

Builds the draft-head subgraph alone (the nodes the draft-head pass adds: adapter, head over the kept
vocabulary, argmax, id map) twice, with the trained head's K rows and with all V rows of the model's
head, and times one decode step's worth (one row) of each on ONNX Runtime CPU, interleaved.

    python benchmarks/draft_head.py --weights head.npz [--model SmolLM2-135M-Instruct] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgedec.draft_head import DraftHead


def head_graph(head: DraftHead, table: np.ndarray, id_map: np.ndarray) -> onnx.ModelProto:
    hidden = head.w2.shape[0]
    inits = [numpy_helper.from_array(head.w1, "w1"), numpy_helper.from_array(head.b1, "b1"),
             numpy_helper.from_array(head.w2, "w2"), numpy_helper.from_array(np.ascontiguousarray(table.T), "t"),
             numpy_helper.from_array(id_map.astype(np.int64), "ids")]
    mk = helper.make_node
    nodes = [mk("Concat", ["h", "e"], ["x"], axis=-1), mk("MatMul", ["x", "w1"], ["a"]), mk("Add", ["a", "b1"], ["ab"]),
             mk("Sigmoid", ["ab"], ["g"]), mk("Mul", ["ab", "g"], ["s"]), mk("MatMul", ["s", "w2"], ["d"]),
             mk("Add", ["h", "d"], ["z"]), mk("MatMul", ["z", "t"], ["l"]),
             mk("ArgMax", ["l"], ["r"], axis=-1, keepdims=0), mk("Gather", ["ids", "r"], ["draft"], axis=0)]
    g = helper.make_graph(nodes, "draft_head",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden]),
                           helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 1, hidden])],
                          [helper.make_tensor_value_info("draft", TensorProto.INT64, [1, 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--model", default=None, help="source model (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()

    from edgedec.models.source import load

    head = DraftHead.load(args.weights)
    full = load(args.model).model.get_output_embeddings().weight.detach().numpy()  # (V, hidden)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {
        "trimmed": ort.InferenceSession(head_graph(head, head.table, head.id_map).SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"]),
        "full": ort.InferenceSession(head_graph(head, full, np.arange(len(full))).SerializeToString(), opts,
                                     providers=["CPUExecutionProvider"]),
    }
    rng = np.random.default_rng(0)
    feed = {"h": rng.standard_normal((1, 1, full.shape[1])).astype(np.float32),
            "e": rng.standard_normal((1, 1, full.shape[1])).astype(np.float32)}
    times = {k: [] for k in sessions}
    for _ in range(50):
        for s in sessions.values():
            s.run(None, feed)
    for _ in range(args.steps):  # interleaved, so drift hits both alike
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    vt = head.stats.get("vocab_trim", {})
    print(json.dumps({"k": int(len(head.id_map)), "vocab": int(len(full)), "coverage": vt.get("coverage"),
                      "draft_step_us_trimmed": round(med["trimmed"], 1), "draft_step_us_full": round(med["full"], 1),
                      "speedup": round(med["full"] / med["trimmed"], 2), "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
