"""``dist-engine graft-mtp | graft-dflash | convert``: the tools that make model files (an
MTP graft, a DFlash drafter, an HF folder from a GGUF file)."""

from __future__ import annotations

import argparse

from dist_engine.config import DTYPES
from dist_engine.config.args import DEFAULT_MODEL


def _training_data(a: argparse.Namespace, layers: tuple[int, ...] = ()):
    """What both trainers read: the model's own answers to the graft prompts (generated into
    ``--answers`` or ``OUT/answers.jsonl``, hidden states beside them; ``layers``: decoder layers
    whose outputs are kept too), split into train and held-out by prompt. Returns (train, held,
    prompt lengths, hidden-state folder, device)."""
    import os

    import torch

    from dist_engine.graft.data import generate_answers, split_answers
    from dist_engine.graft.prompts import split_prompts

    train_p, held_p = split_prompts(limit=a.num_prompts)
    answers_file = a.answers or os.path.join(a.out, "answers.jsonl")
    hidden_dir = os.path.join(os.path.dirname(os.path.abspath(answers_file)), "hidden")
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    recs = generate_answers(a.model, train_p + held_p, answers_file, samples_per_prompt=a.samples_per_prompt,
                            max_tokens=a.max_tokens, batch=a.batch, hidden_dir=hidden_dir, device=device,
                            layers=layers)
    (train, train_lens), (held, held_lens) = split_answers(recs, held_p, train_p)
    return train, held, train_lens + held_lens, hidden_dir, device


def cmd_graft(a: argparse.Namespace) -> int:
    from dist_engine.graft.train import graft
    from dist_engine.weights.registry import resolve_model

    path = resolve_model(a.model)
    train, held, prompt_lens, hidden_dir, device = _training_data(a)
    meta = graft(path, train, held, a.out, epochs=a.epochs, depth=a.depth, lr=a.lr,
                 batch_size=a.batch_size, targets=a.targets, feedback=a.feedback,
                 draft_vocab_size=a.draft_vocab, dtype=a.save_dtype, init_from=a.init,
                 prompt_lens=prompt_lens, hidden_dir=hidden_dir, device=device,
                 time_budget_s=a.time_budget,
                 extra_meta={"samples_per_prompt": a.samples_per_prompt, "max_tokens": a.max_tokens})
    ho = meta["held_out"]
    last = ho[max((k for k in ho if k.startswith("epoch_")), key=lambda k: int(k[6:]))]
    print(f"graft written to {a.out}: held-out accuracy per depth {last['accuracy_per_depth']} "
          f"(untrained {meta['held_out']['untrained']['accuracy_per_depth']}, repeat-last-token "
          f"{last['repeat_last_token_accuracy']}); draft vocabulary covers "
          f"{meta['draft_vocab_coverage']:.1%} of predictions")
    return 0


def cmd_graft_dflash(a: argparse.Namespace) -> int:
    from dist_engine.config import ModelConfig
    from dist_engine.graft.dflash_model import default_target_layers
    from dist_engine.graft.dflash_train import graft_dflash
    from dist_engine.weights.registry import resolve_model

    path = resolve_model(a.model)
    cfg = ModelConfig.from_pretrained(path)
    layers = a.target_layers or default_target_layers(cfg.num_hidden_layers, a.num_target_layers)
    train, held, prompt_lens, hidden_dir, device = _training_data(a, tuple(layers))
    meta = graft_dflash(path, train, held, a.out, prompt_lens=prompt_lens, block_size=a.block_size,
                        num_layers=a.num_layers, target_layer_ids=layers, mask_token_id=a.mask_token_id,
                        gamma=a.loss_decay_gamma, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                        anchors=a.anchors, eval_answers=a.eval_answers, time_budget_s=a.time_budget,
                        draft_vocab_size=a.draft_vocab or None,
                        dtype=a.save_dtype, init_from=a.init, hidden_dir=hidden_dir, device=device,
                        extra_meta={"samples_per_prompt": a.samples_per_prompt, "max_tokens": a.max_tokens})
    ho = meta["held_out"]
    last = ho[max((k for k in ho if k.startswith("epoch_")), key=lambda k: int(k[6:]), default="initial")]
    print(f"DFlash drafter written to {a.out}: held-out accuracy per slot {last['accuracy_per_slot']}, "
          f"mean accepted length for K=1..{a.block_size - 1} {last['mean_accepted_length_per_k']} "
          f"(initialised: {ho['initial']['mean_accepted_length_per_k']}); use it with "
          f"--speculative dflash --speculative-model {a.out}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from dist_engine.weights.gguf_convert import convert_gguf

    print(convert_gguf(a.gguf, a.out))
    return 0


def register(sub) -> None:
    """The model-file commands."""
    gm = sub.add_parser("graft-mtp", help="fit an MTP layer to a model by self-distillation")
    gm.add_argument("--model", default=DEFAULT_MODEL)
    gm.add_argument("--out", required=True, help="graft folder (resumes if it holds a checkpoint)")
    gm.add_argument("--answers", default=None, help="answers file (default OUT/answers.jsonl)")
    gm.add_argument("--samples-per-prompt", type=int, default=2,
                    help="answers per prompt: one greedy, the rest sampled at T=0.7")
    gm.add_argument("--max-tokens", type=int, default=192)
    gm.add_argument("--batch", type=int, default=96, help="concurrent generations")
    gm.add_argument("--epochs", type=int, default=8)
    gm.add_argument("--depth", type=int, default=3, help="chained MTP steps trained")
    gm.add_argument("--lr", type=float, default=1e-3)
    gm.add_argument("--batch-size", type=int, default=2,
                    help="answers per optimiser step (small batches: more steps per epoch)")
    gm.add_argument("--targets", choices=("soft", "hard"), default="soft",
                    help="soft: the base's distribution over the draft vocabulary plus its greedy "
                         "token; hard: the greedy token only")
    gm.add_argument("--feedback", choices=("normed", "raw"), default="normed",
                    help="what a chained MTP step feeds the next: its output after "
                         "shared_head.norm, or the raw output")
    gm.add_argument("--draft-vocab", type=int, default=8192,
                    help="draft over this many most frequent predicted tokens")
    gm.add_argument("--save-dtype", choices=DTYPES, default="bfloat16")
    gm.add_argument("--init", default=None, metavar="GRAFT_DIR",
                    help="start from this graft (same base) instead of a copy of the base's last "
                         "layer, e.g. to continue training on more answers")
    gm.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where answers are generated and the layer trained (auto: cuda if present)")
    gm.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop training after this long (evaluation not counted); lr decays over it")
    gm.add_argument("--num-prompts", type=int, default=None,
                    help="answer only the first N prompts of the set (default: all)")
    gm.set_defaults(func=cmd_graft)

    gd = sub.add_parser("graft-dflash", help="train a DFlash block drafter for a model from its own answers")
    gd.add_argument("--model", default=DEFAULT_MODEL)
    gd.add_argument("--out", required=True, help="drafter folder (resumes if it holds a checkpoint)")
    gd.add_argument("--answers", default=None,
                    help="answers file (default OUT/answers.jsonl; graft-mtp can share it)")
    gd.add_argument("--num-prompts", type=int, default=None,
                    help="answer only the first N prompts of the set (default: all)")
    gd.add_argument("--samples-per-prompt", type=int, default=2,
                    help="answers per prompt: one greedy, the rest sampled at T=0.7")
    gd.add_argument("--max-tokens", type=int, default=192)
    gd.add_argument("--batch", type=int, default=96, help="concurrent generations")
    gd.add_argument("--block-size", type=int, default=8, help="tokens per block: the known one and B-1 masks")
    gd.add_argument("--num-layers", type=int, default=2,
                    help="drafter layers (start as copies of the model's first layers)")
    gd.add_argument("--target-layers", type=lambda v: [int(i) for i in v.split(",")], default=None,
                    metavar="I,J,...", help="model layers whose outputs are the drafter's context "
                    "(default: --num-target-layers spread from layer 1 to the fourth-last)")
    gd.add_argument("--num-target-layers", type=int, default=4)
    gd.add_argument("--mask-token-id", type=int, default=None,
                    help="default: the vocabulary id least seen in the answers")
    gd.add_argument("--loss-decay-gamma", type=float, default=None,
                    help="slot k's loss weight exp(-(k-1)/gamma) (default 4 for blocks of 8, 7 for 16)")
    gd.add_argument("--epochs", type=int, default=2)
    gd.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop training after this long (evaluation not counted); lr decays over it")
    gd.add_argument("--lr", type=float, default=6e-4)
    gd.add_argument("--batch-size", type=int, default=4, help="answers per optimiser step")
    gd.add_argument("--anchors", type=int, default=32, help="random blocks per answer and step")
    gd.add_argument("--eval-answers", type=int, default=64, help="held-out answers scored after each epoch")
    gd.add_argument("--draft-vocab", type=int, default=8192,
                    help="train and draft over this many most frequent predicted tokens (0: all)")
    gd.add_argument("--save-dtype", choices=DTYPES, default="bfloat16")
    gd.add_argument("--init", default=None, metavar="DRAFTER_DIR",
                    help="continue from a drafter this command wrote for the same model")
    gd.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where answers are generated and the drafter trained (auto: cuda if present)")
    gd.set_defaults(func=cmd_graft_dflash)

    c = sub.add_parser("convert", help="convert a Llama-family GGUF file to an HF-format folder")
    c.add_argument("--gguf", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=cmd_convert)
