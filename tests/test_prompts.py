"""Prompt formats (dret.prompts) on SmolLM2's tokenizer, token-exact; pooling that leaves the instruction out; the
formats through the training data (bge_icl examples, NV-Embed's pool_from)."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from dret import prompts
from dret.data import TrainData
from dret.errors import DretError
from dret.gguf_io import load_tokenizer, open_gguf
from dret.pooling import pool
from dret.resources import bundled_smollm2
from dret.tokens import configure

BOS, EOS, QUOTE, NL, NL2 = 1, 2, 18, 198, 1116
INSTRUCT, QUERY, RESPONSE = 49152, 49153, 49154  # added first, as the bge_icl tokenizer's new ids
CAT_Q = [5588, 314, 253, 2644, 47]  # "what is a cat?"
CAT_P = [49, 2644, 314, 253, 1165, 3161, 30]  # "A cat is a small animal."
FIND = [11933, 14471, 198]  # "Find passages\n"
SUMMARIZE = [1002, 20947, 260, 2120, 7429, 1127, 4475, 1924, 42, 216]  # '", summarize the above ... words: '
PREDICT = [1002, 3142, 260, 1695, 7429, 1127, 4475, 1924, 42, 216]  # '", predict the following ... words: '
TASK = "Find passages"
NV_INSTRUCTION = "Instruct: Find passages\nQuery: "


@pytest.fixture(scope="module")
def base():
    return load_tokenizer(open_gguf(bundled_smollm2()))


def _tok(base, fmt, bos=1, eos=1):
    tok = configure(base, add_bos_token=bos, add_eos_token=eos, source="smollm2")
    prompts.add_special_tokens(tok, fmt)
    return tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_added_once(base):
    tok = configure(base, source="smollm2")
    with pytest.raises(DretError, match="the tokenizer lacks <instruct>, <query>, <response>: expected them added"):
        prompts.encode("bge_icl", tok, ["q"], role="query", max_length=32)
    assert [prompts.add_special_tokens(tok, "bge_icl") for _ in range(2)] == [3, 0]
    assert [prompts.add_special_tokens(tok, "llara") for _ in range(2)] == [16, 0]
    assert prompts.add_special_tokens(tok, "plain") == 0 and len(tok) == 49152 + 19
    assert _ids(tok, "a<instruct><query><response><s1><s16>") == [81, INSTRUCT, QUERY, RESPONSE, 49155, 49170]
    assert len(base) == 49152  # the fixture's own tokenizer is untouched


def test_plain_is_instruction_plus_text_truncated(base):
    tok = _tok(base, "plain")
    for fmt in ("plain", ""):
        assert prompts.encode(fmt, tok, ["what is a cat?"], role="query", max_length=4,
                              instruction=NV_INSTRUCTION) == [[BOS, 6744, 961, EOS]]  # "Instruct", ":"
        assert prompts.encode(fmt, tok, ["A cat is a small animal."], role="passage", max_length=64) == [
            [BOS, *CAT_P, EOS]]
    assert prompts.instruction_length(tok, NV_INSTRUCTION) == len(_ids(tok, NV_INSTRUCTION)) == 9
    assert prompts.instruction_length(tok, "") == 0
    with pytest.raises(DretError, match="prompt_format='chat': expected one of plain, bge_icl, llara"):
        prompts.encode("chat", tok, ["q"], role="query", max_length=8)


def test_llara_prefix_text_suffix(base):
    tok = _tok(base, "llara", eos=0)
    s1_8, s9_16 = list(range(49152, 49160)), list(range(49160, 49168))
    assert prompts.encode("llara", tok, ["A cat is a small animal."], role="passage", max_length=64) == [
        [BOS, QUOTE, *CAT_P, *SUMMARIZE, *s1_8]]
    assert prompts.encode("llara", tok, ["what is a cat?"], role="query", max_length=64) == [
        [BOS, QUOTE, *CAT_Q, *PREDICT, *s9_16]]
    # truncation cuts the text only: 2 + 3 + 18 tokens
    assert prompts.encode("llara", tok, ["A cat is a small animal."], role="passage", max_length=23) == [
        [BOS, QUOTE, *CAT_P[:3], *SUMMARIZE, *s1_8]]
    # the reference's way on a long text: prefix with special tokens + text ids cut + suffix ids
    text = " ".join(f"word{i}" for i in range(300))
    suffix = '", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>'
    prefix_ids, suffix_ids = tok('"')["input_ids"], _ids(tok, suffix)
    expected = prefix_ids + _ids(tok, text)[:100 - len(prefix_ids) - len(suffix_ids)] + suffix_ids
    assert prompts.encode("llara", tok, [text], role="passage", max_length=100) == [expected] and len(expected) == 100
    assert prompts.encode("llara", tok, ["A cat"], role="passage", max_length=21)[0][2] == 49  # 1 token of text
    with pytest.raises(DretError, match="a passage max length of 20 cannot hold the prompt .20 tokens. and a token "
                                        "of text: expected at least 21"):
        prompts.encode("llara", tok, ["A cat"], role="passage", max_length=20)
    with pytest.raises(DretError, match="prompt_format llara: query instruction 'Find passages' given"):
        prompts.encode("llara", tok, ["q"], role="query", max_length=64, instruction=TASK)
    with pytest.raises(DretError, match="appends a special token .EOS. to every text: expected add_eos_token=0"):
        prompts.encode("llara", _tok(base, "llara", eos=1), ["q"], role="query", max_length=64)


def _examples():
    return [prompts.format_example(TASK, q, r) for q, r in
            (("dogs?", "Dogs bark."), ("fish?", "Fish swim in water."), ("birds?", "Birds fly."))]


def test_bge_icl_query_with_0_1_3_examples(base):
    tok = _tok(base, "bge_icl")
    query = [INSTRUCT, *FIND, QUERY, *CAT_Q, NL, RESPONSE]
    assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=64, instruction=TASK) == [
        [BOS, *query, EOS]]
    example = [INSTRUCT, *FIND, QUERY, 48804, 47, NL, RESPONSE, 40833, 13113, 30]  # dogs? -> Dogs bark.
    assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=64, instruction=TASK,
                          examples=[_examples()[:1]]) == [[BOS, *example, NL2, *query, EOS]]
    reference = "\n\n".join(_examples()) + "\n\n<instruct>Find passages\n<query>what is a cat?\n<response>"
    assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=128, instruction=TASK,
                          examples=[_examples()]) == [tok(reference)["input_ids"]]
    assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=64) == [
        [BOS, *CAT_Q, NL, RESPONSE, EOS]]  # no task: the bare query, as FlagEmbedding
    assert prompts.encode("bge_icl", tok, ["A cat is a small animal."], role="passage", max_length=64) == [
        [BOS, *CAT_P, EOS]]  # passages plain


def test_bge_icl_keeps_whole_examples_and_the_response_end(base):
    tok = _tok(base, "bge_icl")
    with_two = tok("\n\n".join(_examples()[:2]) + "\n\n<instruct>Find passages\n<query>what is a cat?\n<response>")
    n = len(with_two["input_ids"])  # 42: the third example does not fit, the first two do
    for max_length in (n, n + 12):
        assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=max_length,
                              instruction=TASK, examples=[_examples()]) == [with_two["input_ids"]]
    # too short for any example: the query is cut, `\n<response>` and EOS stay
    for examples in (None, [_examples()]):
        assert prompts.encode("bge_icl", tok, ["what is a cat?"], role="query", max_length=12, instruction=TASK,
                              examples=examples) == [[BOS, INSTRUCT, *FIND, QUERY, *CAT_Q[:3], NL, RESPONSE, EOS]]
    long_query = " ".join(f"w{i}" for i in range(200))
    ids = prompts.encode("bge_icl", tok, [long_query], role="query", max_length=50, instruction=TASK,
                         examples=[_examples()])[0]
    assert len(ids) == 50 and ids[:6] == [BOS, INSTRUCT, *FIND, QUERY] and ids[-3:] == [NL, RESPONSE, EOS]
    with pytest.raises(DretError, match="the query prompt .9 tokens with the instruction 'Find passages'. leaves no "
                                        "room for the query in a max length of 9"):
        prompts.encode("bge_icl", tok, ["q"], role="query", max_length=9, instruction=TASK)


def test_pooling_leaves_out_tokens_before_pool_from():
    h_btd = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 3)), jnp.float32)
    segments_bt = jnp.array([[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])  # right- and left-padded, 5 and 4 tokens
    h = np.asarray(h_btd)
    pool_from_b = jnp.array([2, 1])
    np.testing.assert_allclose(pool(h_btd, segments_bt, "mean", pool_from_b),
                               [h[0, 2:5].mean(0), h[1, 3:6].mean(0)], rtol=1e-6)
    np.testing.assert_allclose(pool(h_btd, segments_bt, "cls", pool_from_b), [h[0, 2], h[1, 3]], rtol=1e-6)
    np.testing.assert_allclose(pool(h_btd, segments_bt, "last", pool_from_b), [h[0, 4], h[1, 5]], rtol=1e-6)
    for method in ("cls", "mean", "last", "last_8"):  # 0 is bit-identical to no pool_from
        np.testing.assert_array_equal(pool(h_btd, segments_bt, method, jnp.zeros(2, jnp.int32)),
                                      pool(h_btd, segments_bt, method))
    np.testing.assert_array_equal(pool(h_btd, segments_bt, "mean", jnp.array([5, 4])), np.zeros((2, 3)))


def test_last_8_on_texts_shorter_than_8_tokens_is_their_mean():
    h_btd = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 3)), jnp.float32)
    segments_bt = jnp.array([[1] * 3 + [0] * 9, [1] * 11 + [0]])
    h = np.asarray(h_btd)
    np.testing.assert_allclose(pool(h_btd, segments_bt, "last_8"), [h[0, :3].mean(0), h[1, 3:11].mean(0)],
                               rtol=1e-6)
    np.testing.assert_allclose(pool(h_btd, segments_bt, "last_8", jnp.array([1, 0])), [h[0, 1:3].mean(0),
                                                                                    h[1, 3:11].mean(0)], rtol=1e-6)


def test_read_examples(tmp_path):
    rows = [{"instruct": TASK, "query": "dogs?", "response": "Dogs bark.", "id": 7},
            {"instruct": TASK, "query": "fish?", "response": "Fish swim."}]
    as_json, as_jsonl = tmp_path / "e.json", tmp_path / "e.jsonl"
    as_json.write_text(json.dumps(rows))
    as_jsonl.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    expected = [{k: r[k] for k in ("instruct", "query", "response")} for r in rows]
    assert prompts.read_examples(str(as_json)) == prompts.read_examples(str(as_jsonl)) == expected
    cases = [
        ("a.json", "[{]", "a.json: not valid JSON"),
        ("b.json", '{"query": "x"}', "b.json: expected a JSON list of objects (or a .jsonl file), got dict"),
        ("c.json", "[]", "c.json: no examples: expected at least one"),
        ("d.json", '[{"instruct": "t", "query": "q", "response": "r"}, 3]',
         "d.json item 1: expected an object, got int"),
        ("e.json", '[{"instruct": "t", "response": "r"}]', "e.json item 0: 'query' must be a string (missing)"),
        ("f.jsonl", '{"instruct": "t", "query": "q", "response": "r"}\n\n{"instruct": "t", "query": "q", '
                    '"response": 5}\n', "f.jsonl:3: 'response' must be a string (got int)"),
        ("g.jsonl", '{"instruct": "t", "query": "q", "response": "r"}\nnot json\n', "g.jsonl:2: not valid JSON"),
    ]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        with pytest.raises(DretError, match=re.escape(f"examples file {tmp_path}/{message}")):
            prompts.read_examples(str(tmp_path / name))
    with pytest.raises(DretError, match="examples file .*/none.json: cannot read it"):
        prompts.read_examples(str(tmp_path / "none.json"))


def _write_rows(folder, name, n):
    rows = [{"query": f"{name}{i}?", "pos": [f"{name}{i} yes {j}." for j in range(2)], "neg": [f"{name}{i} no."]}
            for i in range(n)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bge_icl_examples_come_from_other_rows_of_the_same_file(base, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    _write_rows(folder, "a", 5)
    _write_rows(folder, "b", 7)
    tok = _tok(base, "bge_icl")
    data = TrainData(str(folder), tok, global_batch_size=4, group_size=2, query_max_len=256, passage_max_len=16,
                     query_instruction=TASK, prompt_format="bge_icl", examples_per_query=(1, 4),
                     cache_dir=str(tmp_path / "cache"))
    counts = set()
    for step in range(2 * data.steps_per_epoch):
        batch = data.batch(*divmod(step, data.steps_per_epoch))
        for ids, mask in zip(batch["query_ids"], batch["query_mask"]):
            text = tok.decode(ids[mask == 1])
            pairs = re.findall(r"<instruct>Find passages\n<query>(\w+)\?\n<response>([^\n<]*)", text)
            (own, _), examples = pairs[-1], pairs[:-1]  # the row's own query ends the prompt
            assert text.endswith(f"<query>{own}?\n<response><|im_end|>") and 1 <= len(examples) <= 4
            assert all(q != own and q[0] == own[0] and r in (f"{q} yes 0.", f"{q} yes 1.") for q, r in examples)
            counts.add(len(examples))
        np.testing.assert_array_equal(batch["query_pool_from"], 0)
        np.testing.assert_array_equal(batch["passage_pool_from"], 0)
    assert counts == {1, 2, 3, 4}
    again = TrainData(str(folder), tok, global_batch_size=4, group_size=2, query_max_len=256, passage_max_len=16,
                      query_instruction=TASK, prompt_format="bge_icl", examples_per_query=(1, 4),
                      cache_dir=str(tmp_path / "cache"))
    for key, value in data.batch(1, 0).items():  # the same examples for the same (seed, epoch, step)
        np.testing.assert_array_equal(again.batch(1, 0)[key], value, err_msg=key)


def test_pool_from_is_the_instruction_length_for_nv_embed_batches(base, tmp_path):
    _write_rows(tmp_path, "a", 4)
    tok = _tok(base, "plain")
    kw = dict(global_batch_size=2, group_size=2, query_max_len=32, passage_max_len=16, query_instruction=NV_INSTRUCTION,
              cache_dir=str(tmp_path / "cache"))
    nv = TrainData(str(tmp_path / "a.jsonl"), tok, pool_instruction=False, **kw).batch(0, 0)
    assert nv["query_pool_from"].tolist() == [9, 9] and nv["passage_pool_from"].tolist() == [0] * 4
    assert nv["query_pool_from"].dtype == nv["passage_pool_from"].dtype == np.int32
    plain = TrainData(str(tmp_path / "a.jsonl"), tok, **kw).batch(0, 0)
    assert plain["query_pool_from"].tolist() == [0, 0]
    for key in ("query_ids", "query_mask", "passage_ids", "passage_mask"):  # the ids are the same either way
        np.testing.assert_array_equal(nv[key], plain[key], err_msg=key)
    with pytest.raises(DretError, match="prompt_format llara: query instruction"):
        TrainData(str(tmp_path / "a.jsonl"), _tok(base, "llara", eos=0), prompt_format="llara", **kw)
