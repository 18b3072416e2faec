"""gpu_check part ``drafters``: the drafter-model speculative methods on the device.

A tiny random Gemma 4 (tests/gemma4_tiny.py, fp32) with a tiny random assistant drafter and a
tiny random DFlash drafter (tests/test_dflash.py's writer): greedy and seeded output of a batch
of four with each drafter at K = 1..3 against plain decoding on the device (must be identical),
the drafts proposed and accepted, and the time per output token of a K = 3 run relative to plain
(random drafters accept next to nothing, so this is the cost of drafting, not a speed-up).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

PROMPTS = [[1, 17, 230, 45, 99, 3, 150, 150, 7, 310, 64, 12, 88, 5, 201, 33, 42, 19, 260, 4],
           [1, 5, 6], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88, 87], [1, 17, 230, 45, 8, 8]]


def drafters(tmp: str, dev: str, quick: bool) -> dict:
    from gemma4_tiny import make, make_assistant
    from test_dflash import make_drafter

    from dist_engine import LLM, SamplingParams

    target = make("dense", os.path.join(tmp, "drafters-target"))
    methods = {"gemma4_assistant": make_assistant("dense", os.path.join(tmp, "drafters-assistant")),
               "dflash": make_drafter(os.path.join(tmp, "drafters-dflash"))}
    greedy = SamplingParams(temperature=0, max_tokens=16 if quick else 48, ignore_eos=True)
    seeded = [dataclasses.replace(greedy, temperature=0.8, seed=3 + i) for i in range(len(PROMPTS))]
    engine = dict(device=dev, skip_tokenizer_init=True, max_model_len=256, num_kv_blocks=128, block_size=4)

    def run(params, **kw) -> tuple[list, float, object]:
        with LLM(target, **engine, **kw) as llm:
            llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=dataclasses.replace(greedy, max_tokens=4))
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
            if dev == "cuda":
                torch.cuda.synchronize()
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            return [o.outputs[0].token_ids for o in outs], (time.perf_counter() - t) / n, llm.engine.spec_stats

    plain, plain_s, _ = run(greedy)
    plain_seeded = run(seeded)[0]
    res: dict = {"plain_s_per_token": plain_s}
    for method, folder in methods.items():
        r: dict = {}
        for k in (1, 2, 3):
            spec = dict(speculative=method, speculative_model=folder, num_speculative_tokens=k,
                        min_draft_acceptance=0.0)
            got, s_per_token, stats = run(greedy, **spec)
            r[f"k{k}_greedy_identical"] = got == plain
            r[f"k{k}_seeded_identical"] = run(seeded, **spec)[0] == plain_seeded
            r[f"k{k}_drafted_accepted"] = (stats.num_draft_tokens, stats.num_accepted_tokens)
            if k == 3:
                r["k3_time_per_token_vs_plain"] = s_per_token / plain_s
        res[method] = r
    return res


def graft_dflash(tmp: str, dev: str) -> dict:
    """``graft-dflash`` on the device: tests/test_dflash_graft.py's task (a 4-layer tiny Llama's
    greedy continuations of 300 prompts, generated there with the tapped layers' outputs), the
    drafter trained there (8 epochs), then its held-out output against plain decoding and the
    engine's mean accepted length at K = 3 (the CPU test's floor: 1.8)."""
    import random

    from test_dflash_graft import ENGINE, LAYERS, SPEC

    from conftest import make_tiny
    from dist_engine import LLM, SamplingParams
    from dist_engine.graft.data import save_hidden
    from dist_engine.graft.dflash_train import graft_dflash as train

    path = make_tiny("llama", os.path.join(tmp, "graft-dflash-target"), num_hidden_layers=4)
    r = random.Random(0)
    prompts = [[1] + [r.randrange(3, 300) for _ in range(r.randrange(4, 12))] for _ in range(300)]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(path, device=dev, **ENGINE, hidden_state_layers=LAYERS) as llm:
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=dataclasses.replace(
            greedy, return_hidden_states=True))
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    hidden = os.path.join(tmp, "graft-dflash-hidden")
    save_hidden(hidden, "0", seqs, [o.outputs[0].hidden_states.cpu() for o in outs], tuple(LAYERS))
    folder = os.path.join(tmp, "graft-dflash")
    t = time.perf_counter()
    meta = train(path, seqs[:270], seqs[270:], folder, prompt_lens=[len(p) for p in prompts], block_size=4,
                 num_layers=1, target_layer_ids=LAYERS, epochs=8, lr=3e-3, batch_size=16, anchors=16,
                 dtype="float32", draft_vocab_size=200, hidden_dir=hidden, device=dev)
    seconds = time.perf_counter() - t
    with LLM(path, device=dev, **ENGINE, **SPEC, speculative_model=folder) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts[270:], sampling_params=greedy)]
        stats = llm.engine.spec_stats
    return {"identical": got == [s[len(p):] for s, p in zip(seqs[270:], prompts[270:])],
            "mean_accepted_length": round(stats.mean_accepted_length, 3),
            "report_estimate_k3": meta["held_out"]["epoch_8"]["mean_accepted_length_per_k"][2],
            "train_seconds": round(seconds, 1)}
