"""metrics.py == pytrec_eval (trec_eval) on synthetic runs with ties, graded qrels and edge cases."""

import numpy as np
import pytest
import pytrec_eval

from dret.eval import metrics

CUTOFFS = (1, 3, 5, 10, 100)
TREC = {"ndcg_at": "ndcg_cut_", "map_at": "map_cut_", "recall_at": "recall_", "precision_at": "P_"}


def pytrec_per_query(ranked_ids, scores, qids, qrels, cutoffs=CUTOFFS) -> dict[str, dict[str, float]]:
    """pytrec_eval's values per query with our metric names; MRR@k = recip_rank on the run cut to k."""
    cs = ",".join(map(str, cutoffs))
    ev = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cs}", f"map_cut.{cs}", f"recall.{cs}", f"P.{cs}"})
    run = {q: {d: float(s) for d, s in zip(ids, ss)} for q, ids, ss in zip(qids, ranked_ids, scores)}
    res = ev.evaluate(run)
    out = {q: {f"{ours}_{c}": v[f"{theirs}{c}"] for ours, theirs in TREC.items() for c in cutoffs} for q, v in res.items()}
    for c in cutoffs:
        top = {q: dict(sorted(r.items(), key=lambda x: (x[1], x[0]), reverse=True)[:c]) for q, r in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top)
        for q in out:
            out[q][f"mrr_at_{c}"] = rr[q]["recip_rank"]
    return out


def assert_matches_pytrec(ranked_ids, scores, qids, qrels, cutoffs=CUTOFFS):
    theirs = pytrec_per_query(ranked_ids, scores, qids, qrels, cutoffs)
    evaluated, ours = metrics.per_query(ranked_ids, qids, qrels, cutoffs, scores=scores)
    assert sorted(evaluated) == sorted(theirs)
    for name, values in ours.items():
        for q, v in zip(evaluated, values):
            assert v == pytest.approx(theirs[q][name], abs=1e-9), (name, q)
    means = metrics.evaluate(ranked_ids, qids, qrels, cutoffs, scores=scores)
    for name, v in means.items():
        assert v == pytest.approx(np.mean([theirs[q][name] for q in theirs]), abs=1e-9), name


def test_synthetic_runs_with_ties_and_grades():
    rng = np.random.default_rng(0)
    docs = np.array([f"d{i}" for i in range(300)], dtype=object)
    qids = [f"q{i}" for i in range(40)]
    ranked, scores, qrels = [], [], {}
    for i, q in enumerate(qids):
        rows = rng.choice(len(docs), 120, replace=False)
        ranked.append(docs[rows])
        scores.append(np.round(rng.normal(size=120), 1))  # many ties
        judged = rng.choice(len(docs), rng.integers(1, 30), replace=False)
        qrels[q] = {docs[j]: int(rng.integers(0, 4)) for j in judged}
    qrels["q0"] = {"d1": 0, "d2": 0}  # judged, nothing relevant: counts as zeros
    del qrels["q1"]  # not in qrels: not evaluated
    qrels["q2"] = {"d1": -1, "d3": 2}  # negative grade = not relevant
    assert_matches_pytrec(np.array(ranked), np.array(scores), qids, qrels)


def test_all_scores_tied_break_by_doc_id_descending():
    ranked = np.array([["a", "c", "b", "10", "9"]], dtype=object)
    scores = np.zeros((1, 5))
    qrels = {"q": {"9": 1, "a": 2}}
    assert_matches_pytrec(ranked, scores, ["q"], qrels, cutoffs=(1, 2, 3, 5))
    assert list(metrics.trec_order(ranked, scores)[0]) == ["c", "b", "a", "9", "10"]


def test_run_shorter_than_cutoff_and_more_relevant_than_cutoff():
    ranked = np.array([["a", "b"], ["c", "d"]], dtype=object)
    scores = np.array([[2.0, 1.0], [1.0, 0.5]])
    qrels = {"q0": {d: 1 for d in "abcdefghijkl"}, "q1": {"d": 3, "x": 1}}
    assert_matches_pytrec(ranked, scores, ["q0", "q1"], qrels, cutoffs=(1, 3, 10))


def test_without_scores_the_given_order_is_kept():
    ranked = np.array([["a", "b", "c"]], dtype=object)
    out = metrics.evaluate(ranked, ["q"], {"q": {"b": 1}}, cutoffs=(1, 3))
    assert out["mrr_at_3"] == 0.5 and out["recall_at_1"] == 0.0
