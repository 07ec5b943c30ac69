"""`python -m dret.eval --model DIR --data BEIR_DIR [--split test]` (or --t2ranking / --msmarco_title / --mteb):
encode, search, score; writes output_folder/<dataset>.json and prints a markdown table. The reference's two command
lines run as written: `--query_model A --passage_model B` (a dual encoder) and `--base_model_name_or_path DIR
--task_name TASK --task_split SPLIT`."""

from __future__ import annotations

import argparse
import json
import logging
import os

from dret import model_card, prompts
from dret.errors import DretError, run_command
from dret.eval import cache, datasets, model_dir, sweep
from dret.eval.run import EvalOptions, evaluate_retrieval
from dret.pooling import POOLING_METHODS

TABLE_METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "map_at_10", "precision_at_10", "recall_at_100",
                 "recall_at_1000")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dret.eval", description=__doc__)
    p.add_argument("--model", help="HF / sentence-transformers folder, or a dret training output_dir")
    p.add_argument("--base_model_name_or_path", help="the reference's name for --model")
    p.add_argument("--query_model", help="a dual encoder's query model (with --passage_model, instead of --model)")
    p.add_argument("--passage_model", help="a dual encoder's corpus model (with --query_model)")
    p.add_argument("--model_type", help="accepted for the reference's command lines: dret reads the model type from "
                                        "config.json (a contradicting one is an error)")
    p.add_argument("--step", type=int, help="checkpoint step of a training output_dir (default: the latest)")
    p.add_argument("--evaluate_all", action="store_true", help="evaluate every checkpoint of --checkpoint_dir")
    p.add_argument("--checkpoint_dir", help="a dret training output_dir, with --evaluate_all")
    data = p.add_argument_group("data (one or more)")
    data.add_argument("--data", action="append", default=[], help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/")
    data.add_argument("--t2ranking", help="folder with T2Ranking's collection / queries / qrels tsv files")
    data.add_argument("--msmarco_title", help="folder with MS MARCO corpus.tsv (pid, title, text), queries, qrels")
    data.add_argument("--mteb", help="mteb task names, comma-separated (run by mteb itself)")
    data.add_argument("--task_name", help="the reference's mteb task: run like --mteb TASK, or, with one --data "
                                          "folder, evaluate that local copy under this name")
    data.add_argument("--split", "--task_split", dest="split",
                      help="qrels split (default: test for BEIR, dev for T2Ranking / MS MARCO; mteb: the task's own)")
    m = p.add_argument_group("model options (the reference's names)")
    m.add_argument("--pooling_method", choices=POOLING_METHODS,
                   help="default: the model folder's sentence-transformers config")
    m.add_argument("--query_instruction", help="prefix of every query (default: the model's own, see README)")
    m.add_argument("--document_instruction", help="prefix of every passage (default: the model's own)")
    m.add_argument("--examples_file", help="in-context examples for every query of a bge_icl model: a JSON list or "
                                           "jsonl of {\"instruct\", \"query\", \"response\"}")
    m.add_argument("--max_seq_length", type=int, help="both max lengths (default: the model's)")
    m.add_argument("--query_max_length", type=int)
    m.add_argument("--passage_max_length", type=int)
    m.add_argument("--eval_batch_size", type=int, default=64)
    m.add_argument("--pad_token")
    m.add_argument("--padding_side", choices=("right", "left"),
                   help="accepted for the reference's command lines; texts are packed without padding, so either "
                        "side gives the same vectors")
    m.add_argument("--add_bos_token", type=int, choices=(0, 1))
    m.add_argument("--add_eos_token", type=int, choices=(0, 1))
    m.add_argument("--dim", type=int, help="Matryoshka truncation of the embeddings")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    m.add_argument("--allow_pickle", action="store_true", help="load pytorch_model.bin (a pickle: trusted files only)")
    s = p.add_argument_group("search and output")
    s.add_argument("--top_k", type=int, default=1000)
    s.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="faiss index; ivf / hnsw also report their recall against exact search")
    s.add_argument("--nlist", type=int, default=0)
    s.add_argument("--nprobe", type=int, default=32)
    s.add_argument("--shard_size", type=int, default=1_000_000, help="passages encoded and searched at a time")
    s.add_argument("--cache_dir", default=cache.default_dir(), help="corpus embedding cache ($DRET_CACHE)")
    s.add_argument("--no_cache", action="store_true")
    s.add_argument("--output_folder", default="eval_results")
    s.add_argument("--update_model_card", action="store_true",
                   help="append the results table to the model folder's README.md (its model card)")
    return p.parse_args(argv)


def markdown_table(results: list[dict]) -> str:
    names = [m for m in TABLE_METRICS if any(m in r for r in results)]
    lines = ["| dataset | " + " | ".join(names) + " | seconds |", "|---" * (len(names) + 2) + "|"]
    for r in results:
        cells = [f"{100 * r[m]:.2f}" if m in r else "" for m in names]
        lines.append(f"| {r['dataset']} | " + " | ".join(cells) + f" | {r['total_seconds']:.1f} |")
    return "\n".join(lines)


def _unique_names(results: list[dict]) -> None:
    """Give each result its own dataset name (and so its own JSON file): a repeated name gets _2, _3, ..."""
    taken = set()
    for r in results:
        name, n = r["dataset"], 1
        while name in taken:
            n += 1
            name = f"{r['dataset']}_{n}"
        taken.add(name)
        r["dataset"] = name


def _local_sets(args) -> list:
    sets = [datasets.load_beir(d, args.split or "test") for d in args.data]
    if args.task_name and sets:
        sets[0].name = args.task_name  # main checked: one --data folder
    if args.t2ranking:
        sets.append(datasets.load_t2ranking(args.t2ranking, args.split or "dev"))
    if args.msmarco_title:
        sets.append(datasets.load_msmarco_title(args.msmarco_title, args.split or "dev"))
    return sets


def _instruction(given: str | None, prompts: dict[str, str], role: str, flag: str) -> str:
    """The flag's instruction, else the model's own for `role` (said in the log), else none."""
    if given is not None or role not in prompts:
        return given or ""
    logging.getLogger("dret").warning("%s %r: the model's own (pass %s '' for none)", flag, prompts[role], flag)
    return prompts[role]


def _options(args, query_instruction: str, document_instruction: str) -> EvalOptions:
    return EvalOptions(query_instruction=query_instruction, document_instruction=document_instruction,
                       query_max_length=args.query_max_length or args.max_seq_length,
                       passage_max_length=args.passage_max_length or args.max_seq_length,
                       eval_batch_size=args.eval_batch_size, dim=args.dim, top_k=args.top_k, index=args.index,
                       nlist=args.nlist, nprobe=args.nprobe, shard_size=args.shard_size,
                       cache_dir=None if args.no_cache else args.cache_dir,
                       examples=tuple(prompts.format_example(**e) for e in prompts.read_examples(args.examples_file))
                       if args.examples_file else ())


def _models(args) -> list[tuple[str, str]]:
    """[(flag, path)] of the model: one for both sides, or a dual encoder's query and passage models."""
    if args.model and args.base_model_name_or_path:
        raise DretError("--model and --base_model_name_or_path name the same thing: pass one")
    model = args.model or args.base_model_name_or_path
    flag = "--model" if args.model else "--base_model_name_or_path"
    if args.query_model or args.passage_model:
        if model:
            raise DretError(f"{flag} and --query_model / --passage_model: pass one model, or a query and a passage "
                            "model")
        if not (args.query_model and args.passage_model):
            given, missing = (("--query_model", "--passage_model") if args.query_model
                              else ("--passage_model", "--query_model"))
            raise DretError(f"{given} needs {missing} (a dual encoder has both; one model for both: --model DIR)")
        return [("--query_model", args.query_model), ("--passage_model", args.passage_model)]
    if not model:
        raise DretError("--model is required (or --base_model_name_or_path, --query_model with --passage_model, or "
                        "--evaluate_all --checkpoint_dir DIR)")
    return [(flag, model)]


def _lazy_model(args, flag: str, path: str, step: int | None):
    """(get_embedder: the model loaded on first use, at most once; its cache key; its own instructions)."""
    load, key, prompts = model_dir.resolve(path, pooling=args.pooling_method, dtype=args.dtype, step=step,
                                  pad_token=args.pad_token, add_bos_token=args.add_bos_token,
                                  add_eos_token=args.add_eos_token, allow_pickle=args.allow_pickle,
                                  model_type=args.model_type, flag=flag)
    embedder = []

    def get_embedder():
        if not embedder:
            embedder.append(load())
        return embedder[0]

    return get_embedder, key, prompts


def evaluate_model(args, models: list[tuple[str, str]], step: int | None = None) -> list[dict]:
    """Every requested data set with one model, or a dual encoder (`models`: [(flag, path)], query model first):
    queries encoded by the first, the corpus by the last; each loaded at most once, and only if some embedding it
    gives is not cached."""
    (query_flag, query_path), (passage_flag, passage_path) = models[0], models[-1]
    query = _lazy_model(args, query_flag, query_path, step)
    same = os.path.realpath(query_path) == os.path.realpath(passage_path)
    passage = query if same else _lazy_model(args, passage_flag, passage_path, step)
    (get_query, query_key, query_prompts), (get_passage, passage_key, passage_prompts) = query, passage
    opts = _options(args, _instruction(args.query_instruction, query_prompts, "query", "--query_instruction"),
                    _instruction(args.document_instruction, passage_prompts, "document", "--document_instruction"))
    results = []
    for data in _local_sets(args):
        result = evaluate_retrieval(get_query, data, opts, query_key, get_passage_embedder=get_passage,
                                    passage_key=passage_key)
        result.update(model=os.path.abspath(query_path), passage_model=os.path.abspath(passage_path), step=step,
                      split=args.split, dtype=args.dtype,
                      options={k: v for k, v in vars(args).items() if k not in ("data", "model")})
        results.append(result)
    tasks = [("--mteb", args.mteb)] if args.mteb else []
    tasks += [("--task_name", args.task_name)] if args.task_name and not args.data else []
    if tasks:
        from dret.eval.mteb_model import run_mteb_tasks
    for flag, names in tasks:
        results += run_mteb_tasks(get_query, names.split(","), opts, split=args.split, flag=flag,
                                  get_passage_embedder=get_passage)
    for r in results:
        r.update(query_instruction=opts.query_instruction, document_instruction=opts.document_instruction,
                 examples=len(opts.examples))
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.padding_side:
        logging.getLogger("dret").warning("--padding_side %s changes nothing: texts are packed without padding, so "
                                          "either side gives the same vectors", args.padding_side)
    if args.model_type:
        logging.getLogger("dret").warning("--model_type %s changes nothing: dret reads the model type from "
                                          "config.json", args.model_type)
    if not (args.data or args.t2ranking or args.msmarco_title or args.mteb or args.task_name):
        raise DretError("no data: pass --data BEIR_DIR, --t2ranking DIR, --msmarco_title DIR, --mteb TASK or "
                        "--task_name TASK")
    if args.task_name and len(args.data) > 1:
        raise DretError(f"--task_name {args.task_name} names one --data folder (its local copy), got "
                        f"{len(args.data)}")
    if args.evaluate_all:
        if not args.checkpoint_dir:
            raise DretError("--evaluate_all needs --checkpoint_dir (a dret training output_dir)")
        rows = [r for step in sweep.checkpoint_steps(args.checkpoint_dir)
                for r in evaluate_model(args, [("--checkpoint_dir", args.checkpoint_dir)], step)]
        os.makedirs(args.output_folder, exist_ok=True)
        with open(os.path.join(args.output_folder, "checkpoints.md"), "w") as f:
            f.write(sweep.table(rows) + "\n")
        sweep.plot(rows, os.path.join(args.output_folder, "checkpoints.png"))
        print(sweep.table(rows))
        return rows
    models = _models(args)
    if args.update_model_card and (len(models) > 1 or not os.path.isfile(os.path.join(models[0][1], "config.json"))):
        raise DretError("--update_model_card needs one model folder (--model DIR with a config.json), not a training "
                        "output_dir or a query/passage pair")
    results = evaluate_model(args, models, args.step)
    _unique_names(results)
    os.makedirs(args.output_folder, exist_ok=True)
    for r in results:
        with open(os.path.join(args.output_folder, f"{r['dataset']}.json"), "w") as f:
            json.dump(r, f, indent=1)
    print(markdown_table(results))
    if args.update_model_card:
        model_card.append(models[0][1], f"Evaluation (dret.eval, split {args.split or 'default'})",
                          markdown_table(results) + "\n\nMetrics in percent; " + _settings(args, results[0]))
    return results


def _settings(args, result: dict) -> str:
    """The options that change the numbers, as one line for a model card."""
    own = "the model's"
    return (f"query instruction {result['query_instruction']!r}, document instruction "
            f"{result['document_instruction']!r}, "
            f"max lengths {args.query_max_length or args.max_seq_length or own} / "
            f"{args.passage_max_length or args.max_seq_length or own} tokens, top {args.top_k}.")


if __name__ == "__main__":
    run_command(main)
