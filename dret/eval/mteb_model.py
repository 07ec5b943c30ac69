"""mteb 2 bridge: an Embedder as an mteb EncoderProtocol model, a local `Retrieval` as an mteb retrieval task
(offline: no hub), and `--mteb TASK` runs. mteb (and torch) are imported only here."""

from __future__ import annotations

import difflib

import numpy as np

from dret.dual_encoder import DualEncoder
from dret.errors import DretError
from dret.eval.datasets import Retrieval
from dret.pooling import l2_normalize


class MtebModel:
    """What mteb.evaluate needs: mteb_model_meta, encode(DataLoader of {"text": [...]}), similarity(_pairwise).
    Queries are encoded by `embedder`, documents by `passage_embedder` (default: the same model)."""

    def __init__(self, embedder, *, passage_embedder=None, name: str = "dret/model", query_instruction: str = "",
                 document_instruction: str = "", query_max_length: int | None = None,
                 passage_max_length: int | None = None, batch_size: int = 64, dim: int | None = None,
                 progress: bool = False):
        from mteb.models.model_meta import ModelMeta

        self.pair = DualEncoder(embedder, passage_embedder)
        self.dim, self.batch_size, self.progress = dim, batch_size, progress
        # score like dret's search: cosine iff vectors are unit
        self.cosine = all(getattr(e, "normalize", True) for e in (self.pair.query, self.pair.passage))
        self.query = (query_instruction, query_max_length)
        self.document = (document_instruction, passage_max_length)
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name, "embed_dim": dim or embedder.dim, "max_tokens": embedder.max_length,
            "similarity_fn_name": "cosine" if self.cosine else "dot", "framework": ["JAX"], "modalities": ["text"]})

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None, prompt_type=None, **kwargs):
        """Texts of every batch -> float32 [N, d]; queries get the query instruction and max length."""
        texts = [t for batch in inputs for t in batch["text"]]
        is_query = prompt_type is not None and str(getattr(prompt_type, "value", prompt_type)) == "query"
        instruction, max_length = self.query if is_query else self.document
        encode = self.pair.encode_queries if is_query else self.pair.encode_corpus
        return encode(texts, batch_size=self.batch_size, max_length=max_length, instruction=instruction,
                      dim=self.dim, progress=self.progress)

    def _unit(self, x_nd) -> np.ndarray:
        x_nd = np.asarray(x_nd, np.float32)
        return np.asarray(l2_normalize(x_nd)) if self.cosine else x_nd

    def similarity(self, a_nd, b_md):
        """Cosine (dot product for unnormalised models) similarity [N, M], a torch tensor like sentence-transformers."""
        import torch
        return torch.from_numpy(self._unit(a_nd) @ self._unit(b_md).T)

    def similarity_pairwise(self, a_nd, b_nd):
        import torch
        return torch.from_numpy((self._unit(a_nd) * self._unit(b_nd)).sum(-1))


def local_task(data: Retrieval, split: str = "test"):
    """A `Retrieval` as an mteb AbsTaskRetrieval instance: mteb scores it with its own search and metrics."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=data.name, type="Retrieval", main_score="ndcg_at_10", description=f"local folder {data.name}",
            reference=None, dataset={"path": f"local/{data.name}", "revision": "local"}, category="t2t",
            eval_splits=[split], eval_langs=["eng-Latn"], modalities=["text"], date=None, domains=None,
            task_subtypes=None, license=None, annotations_creators=None, dialect=None, sample_creation=None,
            bibtex_citation="")

        def load_data(self, **kwargs) -> None:
            corpus = Dataset.from_dict({"id": data.corpus_ids, "text": data.corpus_texts})
            queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
            self.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": data.qrels,
                                                "top_ranked": None}}}
            self.data_loaded = True

    return LocalRetrieval()


def scores(model_result) -> list[dict]:
    """mteb.evaluate's ModelResult -> one flat dict per task and split (our metric names, fractions)."""
    out = []
    for task_result in model_result.task_results:
        for split, rows in task_result.scores.items():
            for row in rows:
                flat = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                out.append({"dataset": task_result.task_name, "split": split, **flat,
                            "total_seconds": task_result.evaluation_time or 0.0})
    return out


def evaluate_tasks(model: MtebModel, tasks) -> list[dict]:
    """mteb.evaluate on task objects, no result cache (a re-run always re-scores)."""
    import mteb
    return scores(mteb.evaluate(model, tasks, cache=None, show_progress_bar=False))


def _task(name: str, split: str | None, flag: str):
    """mteb's task of that name, on `split` (None: the task's own splits); an unknown name is a DretError listing
    close ones, a split mteb does not evaluate the task on a DretError naming those it does."""
    import mteb
    try:
        task = mteb.get_task(name)
    except KeyError:
        close = difflib.get_close_matches(name, [task.metadata.name for task in mteb.get_tasks()], n=3)
        raise DretError(f"{flag}: unknown task {name!r}" + (f" (close: {', '.join(close)})" if close else "")
                        ) from None
    if split is not None:
        if split not in task.metadata.eval_splits:
            raise DretError(f"{flag} {name}: mteb evaluates it on {', '.join(task.metadata.eval_splits)}, "
                            f"not on split {split!r}")
        task.filter_eval_splits(eval_splits=[split])
    return task


def _load_data(task, flag: str) -> None:
    """Load a task's data from the HF hub or its cache; no network is a DretError that says what to do instead."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        task.load_data()
    except (ConnectionError, LocalEntryNotFoundError) as e:
        reason = " ".join(str(e).split())
        name = task.metadata.name
        local = "--data FOLDER" if flag == "--mteb" else f"{flag} {name} --data FOLDER"
        raise DretError(f"{flag} {name}: its data ({task.metadata.dataset['path']}) could not be "
                        f"downloaded ({reason}): there is no network or HF_HUB_OFFLINE=1 is set, and mteb's "
                        f"Hugging Face cache ({HF_HUB_CACHE}) does not hold it; evaluate a local BEIR copy with "
                        f"{local} instead") from None


def run_mteb_tasks(get_embedder, names: list[str], opts, *, split: str | None = None, flag: str = "--mteb",
                   get_passage_embedder=None) -> list[dict]:
    """`--mteb A,B` (or `--task_name A`, the flag errors name): mteb's own tasks, on `split` (None: each task's
    own). Queries are encoded by get_embedder(), documents by get_passage_embedder() (default: the same model).
    Each task's data is loaded before the models (a missing download fails fast) and dropped after its scoring."""
    tasks = [_task(name.strip(), split, flag) for name in names if name.strip()]
    if not tasks:
        raise DretError(f"{flag}: expected comma-separated task names, got {','.join(names)!r}")
    model, results = None, []
    for task in tasks:
        _load_data(task, flag)
        if model is None:
            model = MtebModel(get_embedder(), passage_embedder=get_passage_embedder() if get_passage_embedder else None,
                              query_instruction=opts.query_instruction, document_instruction=opts.document_instruction,
                              query_max_length=opts.query_max_length, passage_max_length=opts.passage_max_length,
                              batch_size=opts.eval_batch_size, dim=opts.dim, progress=opts.progress)
        results += evaluate_tasks(model, [task])
        task.unload_data()
    return results
