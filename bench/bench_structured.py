"""Structured output's cost per token: the grammar matcher alone (llguidance, and xgrammar when
installed, on the same schema and token stream), then end to end in the engine, batch 1 and
batch 8, with speculation off and on (paired: free and JSON-schema requests in turn).

    python bench/bench_structured.py [--rounds 6] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from dist_engine import LLM, SamplingParams
from dist_engine.engine.structured import StructuredOutputs, ll_tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "city": {"type": "string"},
                         "hobbies": {"type": "array", "items": {"type": "string"}}}}
PROMPTS = ["Invent a person and describe them as JSON with name, age, city and hobbies.",
           "Describe a fictional librarian as JSON (name, age, city, hobbies).",
           "Give a JSON profile of a made-up chef: name, age, city, hobbies.",
           "Make up a JSON record for a sailor with name, age, city and hobbies."]


def matcher_cost(tok, text: str, vocab: int) -> dict:
    """Milliseconds per token to compute the next-token mask and consume the token."""
    from llguidance import LLMatcher
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

    ids = tok.encode(text, add_special_tokens=False)
    so = StructuredOutputs(json=SCHEMA)
    lt = ll_tokenizer(tok, vocab)
    out = {}
    m = LLMatcher(lt, so.to_grammar())
    bits = allocate_token_bitmask(1, vocab)
    t0 = time.perf_counter()
    for i in ids:
        fill_next_token_bitmask(m, bits, 0)
        assert m.consume_token(i), m.get_error()
    out["llguidance_ms_per_token"] = (time.perf_counter() - t0) / len(ids) * 1000
    try:
        import xgrammar as xgr
    except ImportError:
        return out
    comp = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab))
    xm = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                     separators=(", ", ": ")))
    xb = xgr.allocate_token_bitmask(1, vocab)
    t0 = time.perf_counter()
    for i in ids:
        xm.fill_next_token_bitmask(xb)
        assert xm.accept_token(i)
    out["xgrammar_ms_per_token"] = (time.perf_counter() - t0) / len(ids) * 1000
    return out


def run(llm: LLM, batch: int, constrained: bool, i: int, max_tokens: int) -> tuple[float, int, int]:
    """(mean TPOT in ms, tokens, JSON outputs that parse) of one batch."""
    so = StructuredOutputs(json=SCHEMA) if constrained else None
    ids = [llm.apply_chat_template([{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}])
           for j in range(batch)]
    outs = llm.generate(prompt_token_ids=ids, sampling_params=SamplingParams(
        temperature=0, max_tokens=max_tokens, structured_outputs=so))
    tpots = [o.metrics.time_per_output_token for o in outs if o.metrics.time_per_output_token]
    ok = 0
    for o in outs:
        try:
            json.loads(o.outputs[0].text)
            ok += 1
        except json.JSONDecodeError:
            pass
    return statistics.mean(tpots) * 1000, sum(len(o.outputs[0].token_ids) for o in outs), ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    report = {"rounds": a.rounds, "max_tokens": a.max_tokens, "rows": []}
    for speculative in ("none", "mtp"):
        with LLM("smollm2-135m-instruct", speculative=speculative, max_model_len=1024,
                 kv_cache_memory="256MiB") as llm:
            if speculative == "none":
                text = json.dumps({"name": "Ada Lovelace", "age": 36, "city": "London",
                                   "hobbies": ["mathematics", "poetry", "engines"]})
                report["matcher"] = matcher_cost(llm.tokenizer, text, llm.config.model.vocab_size)
            run(llm, 1, True, 0, 8)  # compile, warm up
            for batch in (1, 8):
                free, json_, ok, toks = [], [], 0, 0
                for i in range(a.rounds):
                    order = (False, True) if i % 2 == 0 else (True, False)
                    for c in order:
                        t, n, good = run(llm, batch, c, i, a.max_tokens)
                        (json_ if c else free).append(t)
                        if c:
                            ok, toks = ok + good, toks + n
                ratios = [b / f for f, b in zip(free, json_)]
                row = {"speculative": speculative, "batch": batch,
                       "free_tpot_ms": statistics.median(free), "json_tpot_ms": statistics.median(json_),
                       "overhead": statistics.median(ratios) - 1, "json_parsed": f"{ok}/{a.rounds * batch}",
                       "json_tokens": toks}
                print(row, flush=True)
                report["rows"].append(row)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "structured.json"), "w") as f:
        json.dump(report, f, indent=2)
    m = report["matcher"]
    lines = ["| speculation | batch | TPOT free ms | TPOT JSON schema ms | median paired overhead | JSON parsed |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['speculative']} | {r['batch']} | {r['free_tpot_ms']:.1f} | {r['json_tpot_ms']:.1f} | "
              f"{r['overhead']:+.1%} | {r['json_parsed']} |" for r in report["rows"]]
    lines.append(f"\nMatcher alone (mask + consume, one token stream of the schema): llguidance "
                 f"{m['llguidance_ms_per_token']:.3f} ms/token"
                 + (f", xgrammar {m['xgrammar_ms_per_token']:.3f} ms/token" if "xgrammar_ms_per_token" in m else "")
                 + ".")
    with open(os.path.join(a.out, "structured.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
