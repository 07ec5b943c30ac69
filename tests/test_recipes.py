"""The reference's other decoder recipes as written (`ml_configs/nv_embed.py`, `bge_en_icl.py`, `llara.py`), tiny:
two steps each, then `dret.eval` on the run's checkpoint, which must apply the recipe's prompt format on the sides
the recipe says (recorded at `dret.prompts.encode`)."""

import importlib
import json

import pytest

from dret import inference, prompts
from dret.eval.__main__ import main as eval_main
from dret.model import Embedder
from dret.trainer import train_and_evaluate
from tests.train_util import small_beir

NV_EMBED_TASK = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
ICL_TASK = "Given a web search query, retrieve relevant passages that answer the query"
EXAMPLE = {"instruct": "Given a topic, find documents", "query": "topic 7", "response": "document 7 about topic 1"}
# recipe -> (its eval's encode calls as {(format, role, instruction, examples given)}, export pooling, format);
# NV-Embed's format is plain (""): its task instruction is a prefix of the queries only
EXPECTED = {
    "nv_embed": ({("", "query", NV_EMBED_TASK, False), ("", "passage", "", False)}, "latent", ""),
    "bge_en_icl": ({("bge_icl", "query", ICL_TASK, True), ("bge_icl", "passage", "", False)}, "last", "bge_icl"),
    "llara": ({("llara", "query", "", False), ("llara", "passage", "", False)}, "last_8", "llara"),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_recipe_trains_two_steps_and_dret_eval_applies_its_prompt_format(name, tmp_path, monkeypatch):
    config = importlib.import_module(f"ml_configs.{name}").get_config()
    config.update(tiny=True, train_data="", output_dir=str(tmp_path / "run"), data_cache_dir=str(tmp_path / "cache"),
                  query_max_len=48, passage_max_len=32, gradient_accumulation_steps=2, max_steps=2, save_steps=1)
    export = train_and_evaluate(config)
    assert inference.saved_steps(config.output_dir) == [1, 2]

    calls, encode = set(), prompts.encode
    def recording(fmt, tokenizer, texts, *, role, instruction="", examples=None, **kwargs):  # noqa: E306
        calls.add((fmt, role, instruction, bool(examples)))
        return encode(fmt, tokenizer, texts, role=role, instruction=instruction, examples=examples, **kwargs)
    monkeypatch.setattr(prompts, "encode", recording)
    (tmp_path / "examples.json").write_text(json.dumps([EXAMPLE]))
    examples = ["--examples_file", str(tmp_path / "examples.json")] if name == "bge_en_icl" else []
    result = eval_main(["--model", config.output_dir, "--data", str(small_beir(tmp_path / "beir")), *examples,
                        "--output_folder", str(tmp_path / "out"), "--no_cache"])[0]
    expected_calls, pooling, prompt_format = EXPECTED[name]
    assert calls == expected_calls and result["ndcg_at_10"] > 0
    exported = Embedder.from_pretrained(export)
    assert (exported.pooling, exported.prompt_format) == (pooling, prompt_format)
