"""Run by test_kserve.py in a separate virtualenv that has tritonclient[grpc] (protobuf 6):
talks to a dist-engine server as an unmodified Triton client and prints one JSON report."""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

target, model, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
client = grpcclient.InferenceServerClient(target)
report = {"live": client.is_server_live(), "ready": client.is_server_ready(),
          "model_ready": client.is_model_ready(model),
          "other_model_ready": client.is_model_ready("nope")}
meta = client.get_model_metadata(model, as_json=True)
report["inputs"] = [t["name"] for t in meta["inputs"]]
report["decoupled"] = client.get_model_config(model, as_json=True)["config"][
    "model_transaction_policy"]["decoupled"]


def inputs(text: str, stream: bool, params: dict):
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    s = grpcclient.InferInput("stream", [1], "BOOL")
    s.set_data_from_numpy(np.array([stream]))
    p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    p.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
    return [t, s, p]


greedy = {"temperature": "0", "max_tokens": "12", "ignore_eos": True}
results: queue.Queue = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)))
client.async_stream_infer(model, inputs(prompt, True, greedy), request_id="s1",
                          outputs=[grpcclient.InferRequestedOutput("text_output")])
client.async_stream_infer(model, inputs(prompt, True, {"temperature": -1}), request_id="bad")
chunks, finals, errors = [], 0, []
while finals < 2:
    result, error = results.get(timeout=120)
    if error is not None:
        errors.append(str(error))
        finals += 1
        continue
    resp = result.get_response()
    out = result.as_numpy("text_output")
    if out is not None and resp.id == "s1":
        chunks.append(out[0].decode())
    if resp.parameters["triton_final_response"].bool_param:
        finals += 1
client.stop_stream()
report.update(stream_chunks=chunks, stream_errors=errors)
unary = client.infer(model, inputs(prompt, False, {**greedy, "max_tokens": 12}),
                     outputs=[grpcclient.InferRequestedOutput("text_output")])
report["unary_text"] = unary.as_numpy("text_output")[0].decode()
try:
    client.infer("nope", inputs(prompt, False, greedy))
except InferenceServerException as e:
    report["unknown_model_error"] = e.status()
print(json.dumps(report))
