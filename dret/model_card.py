"""A model folder's card, `README.md` (YAML front matter + markdown, the Hugging Face / sentence-transformers
convention): the base model and its license, how the export was trained, its training and held-out metrics; and
evaluation tables appended to it later (`dret.eval --update_model_card`)."""

from __future__ import annotations

import json
import os

import yaml

from dret.errors import DretError
from dret.hf_io import sentence_transformers_note
from dret.resources import BUNDLED_MINILM, model_dir

CARD = "README.md"
HUB_NAMES = {BUNDLED_MINILM: "sentence-transformers/all-MiniLM-L6-v2"}  # bundled models -> their hub names
TRAINING_METRICS = ("loss", "accuracy", "grad_norm", "learning_rate", "examples_per_s")


def front_matter(path: str) -> dict:
    """The YAML front matter of a card (a folder's README.md), {} when it has none or no readable one."""
    card = os.path.join(path, CARD) if os.path.isdir(path) else ""
    if not os.path.isfile(card):
        return {}
    text = open(card, encoding="utf-8", errors="replace").read()
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        return {}
    try:
        data = yaml.safe_load(text[4:text.index("\n---", 4)])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def run_metrics(output_dir: str, step: int) -> tuple[dict, dict]:
    """(the last training log row, the last row of eval_* metrics) of a run's metrics.jsonl up to `step`."""
    train, held_out = {}, {}
    path = os.path.join(output_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    for row in rows:
        if row["step"] <= step:
            train = row if "loss" in row else train
            held_out = row if any(k.startswith("eval_") for k in row) else held_out
    return train, held_out


def _table(row: dict, keys) -> str:
    keys = [k for k in keys if k in row]
    return "\n".join(["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|",
                      "| " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |"])


def _usage(config) -> list[str]:
    """How to load the export: sentence-transformers, or, where it cannot reproduce the vectors, dret."""
    note = sentence_transformers_note(config.sentence_pooling_method, config.prompt_format)
    if note:
        return [f"{note}:", "", "```python", "from dret.model import Embedder", "",
                "model = Embedder.from_pretrained(\"path/to/this/folder\")",
                f"queries = model.encode([\"a question\"], role=\"query\", "
                f"instruction={config.query_instruction_for_retrieval!r})",
                f"passages = model.encode([\"a passage\"], role=\"passage\", "
                f"instruction={config.passage_instruction_for_retrieval!r})", "```"]
    return ["```python", "from sentence_transformers import SentenceTransformer", "",
            "model = SentenceTransformer(\"path/to/this/folder\")",
            "queries = model.encode_query([\"a question\"])",
            "passages = model.encode_document([\"a passage\"])", "```", "",
            f"`encode_query` and `encode_document` prefix the instructions the model was trained with (the "
            f"folder's sentence-transformers prompts; `dret.eval` uses them too): queries "
            f"{config.query_instruction_for_retrieval!r}, passages {config.passage_instruction_for_retrieval!r}."]


def training_card(config, *, output_dir: str, step: int, data_files: dict[str, int], dim: int) -> str:
    """The card of the export at `step` of the run in `output_dir`: front matter, usage, data, settings, metrics
    (from its metrics.jsonl), the whole config."""
    folder = model_dir(config)
    base = None if config.tiny else HUB_NAMES.get(config.model_name_or_path, config.model_name_or_path)
    meta = {"base_model": base, "library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "license": front_matter(folder).get("license") if base and folder else None,
            "tags": ["dret", "sentence-transformers", "feature-extraction", "dense-retrieval"]}
    meta = {k: v for k, v in meta.items() if v is not None}
    train, held_out = run_metrics(output_dir, step)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {os.path.basename(os.path.normpath(output_dir))}", "",
             f"A {dim}-dimensional text embedding model ({config.sentence_pooling_method} pooling"
             f"{', L2-normalised' if config.normalized else ''}) fine-tuned from "
             f"{f'`{base}`' if base else 'a random tiny model'} with dret ({config.fine_tune_type}"
             f"{', LoRA merged into the weights' if config.fine_tune_type == 'lora' else ''}), step {step}.", "",
             *_usage(config), "",
             "## Training", "",
             "| data file | rows |", "|---|---|", *[f"| {path} | {rows} |" for path, rows in data_files.items()], "",
             f"{step} steps of {config.per_device_train_batch_size} queries per device x "
             f"{config.gradient_accumulation_steps} micro-batches, group {config.train_group_size} (1 positive), "
             f"query {config.query_max_len} / passage {config.passage_max_len} tokens, learning rate "
             f"{config.learning_rate}, temperature {config.temperature}"
             f"{', negatives from every device' if config.negatives_cross_device else ''}.", ""]
    if train:
        lines += [f"Training metrics at step {train['step']}:", "", _table(train, TRAINING_METRICS), ""]
    if held_out:
        keys = [k for k in held_out if k.startswith("eval_")]
        lines += [f"Held-out evaluation during training ({config.eval_data}, split {config.eval_split}) at step "
                  f"{held_out['step']}:", "", _table(held_out, keys), ""]
    lines += ["## Training config", "", "```json", json.dumps(config.to_dict(), indent=1, default=str), "```", ""]
    return "\n".join(lines)


def append(folder: str, title: str, markdown: str) -> None:
    """Add a `## title` section to the folder's card (created when absent); written whole, then renamed into
    place, so a failed write leaves the old card as it was."""
    if not os.path.isdir(folder):
        raise DretError(f"--update_model_card: {folder} is not a model folder")
    card = os.path.join(folder, CARD)
    old = open(card, encoding="utf-8").read() if os.path.isfile(card) else ""
    tmp = f"{card}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{old.rstrip()}\n\n## {title}\n\n{markdown.strip()}\n".lstrip())
        os.replace(tmp, card)
    except OSError as e:
        raise DretError(f"{card}: cannot update it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
