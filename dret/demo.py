"""`make demo`: fine-tune the bundled all-MiniLM-L6-v2 on the built-in stdlib-docs data, on CPU, and show
retrieval on held-out queries before and after."""

from __future__ import annotations

import logging
import sys

from absl import logging as absl_logging

from dret import model_card
from dret.demo_data import build_pairs, split_pairs
from dret.errors import run_command
from dret.eval.datasets import Retrieval
from dret.eval.run import EvalOptions, evaluate_retrieval
from dret.model import Embedder
from dret.resources import bundled_minilm
from dret.trainer import train_and_evaluate
from ml_configs import quickstart

SHOWN = ("ndcg_at_10", "mrr_at_10", "recall_at_1", "recall_at_10")


def held_out_retrieval() -> Retrieval:
    """Held-out queries against every passage (training passages included, as distractors)."""
    pairs = build_pairs()
    _, held_out = split_pairs(pairs)
    return Retrieval(name="stdlib-docs held-out", corpus_ids=[p["id"] for p in pairs],
                     corpus_texts=[p["passage"] for p in pairs], query_ids=[p["id"] for p in held_out],
                     query_texts=[p["query"] for p in held_out], qrels={p["id"]: {p["id"]: 1} for p in held_out},
                     files=[])


def score(model_dir: str, data: Retrieval, max_length: int) -> dict:
    embedder = Embedder.from_pretrained(model_dir)
    return evaluate_retrieval(lambda: embedder, data, EvalOptions(top_k=10, progress=False,
                                                                   passage_max_length=max_length))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
    config = quickstart.get_config()
    data = held_out_retrieval()
    print(f"Built-in data: {len(data.corpus_texts)} passages from the Python {sys.version.split()[0]} standard "
          f"library's docstrings; {len(data.query_ids)} held-out queries (their one-line summaries).")
    before = score(bundled_minilm(), data, config.passage_max_len)
    print(f"Fine-tuning all-MiniLM-L6-v2 into {config.output_dir} (resumes if already there) ...")
    export_dir = train_and_evaluate(config)
    after = score(export_dir, data, config.passage_max_len)
    rows = [("all-MiniLM-L6-v2", before), ("fine-tuned", after)]
    table = "\n".join([f"| held-out ({len(data.query_ids)} queries) | " + " | ".join(SHOWN) + " |",
                       "|---|" + "---|" * len(SHOWN),
                       *(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in SHOWN) + " |" for name, r in rows)])
    print("\n" + table)
    print("| change | " + " | ".join(f"{after[k] - before[k]:+.4f}" for k in SHOWN) + " |")
    model_card.append(export_dir, f"Held-out evaluation ({data.name})", table)


if __name__ == "__main__":
    run_command(main)
