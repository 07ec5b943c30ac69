"""The reference README's training command lines run with only the program name changed (dret.reference_flags):
each of its flags sets the base.py field of the same name, mixed freely with --config.key=value."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from dret.errors import DretError
from dret.reference_flags import fields, translate
from tests.train_util import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading a config
PASSTHROUGH = {"config", "coordinator_address", "num_processes", "process_id", "logtostderr"}  # dret.train's, absl's
# The reference README's three training commands from `--do_train` on, as written there (its single-GPU and multi-GPU
# BERT commands, then its decoder one with model_name / output_dir set as its README sets them).
REFERENCE = [
    """--do_train \\
              --model_name_or_path rocketqa-zh-base-query-encoder \\
              --output_dir rocketqa-zh-base-query-encoder-duretrieval \\
              --train_data ./data/dureader_dual.train.jsonl \\
              --overwrite_output_dir \\
              --fine_tune_type sft \\
              --sentence_pooling_method cls \\
              --num_train_epochs 3 \\
              --per_device_train_batch_size 64 \\
              --learning_rate 3e-5 \\
              --train_group_size 4 \\
              --recompute \\
              --passage_max_len 512 \\
              --use_matryoshka""",
    """--do_train \\
              --model_name_or_path rocketqa-zh-base-query-encoder \\
              --output_dir rocketqa-zh-base-query-encoder-duretrieval \\
              --train_data ./data/dual.train.json \\
              --overwrite_output_dir \\
              --fine_tune_type sft \\
              --sentence_pooling_method cls \\
              --num_train_epochs 3 \\
              --per_device_train_batch_size 32 \\
              --learning_rate 3e-5 \\
              --train_group_size 8 \\
              --recompute \\
              --passage_max_len 512 \\
              --use_matryoshka""",
    """--do_train \\
    --query_instruction_for_retrieval "query: " \\
    --passage_instruction_for_retrieval "" \\
    --model_name_or_path castorini/repllama-v1-7b-lora-passage \\
    --output_dir repllama-v1-7b-duretrieval$ \\
    --save_steps 100 \\
    --train_data ./data/dureader_dual.train.jsonl  \\
    --bf16 \\
    --per_device_train_batch_size 1 \\
    --gradient_accumulation_steps 32 \\
    --recompute \\
    --train_group_size 4 \\
    --learning_rate 1e-4 \\
    --query_max_len 128 \\
    --passage_max_len 4096 \\
    --num_train_epochs 1 \\
    --logging_steps 1 \\
    --overwrite_output_dir \\
    --negatives_cross_device \\
    --warmup_steps 100 \\
    --do_train \\
    --fine_tune_type lora \\
    --fp16_opt_level "O2" \\
    --sentence_pooling_method last \\
    --sharding "stage3 offload" \\
    --use_flash_attention \\
    --temperature 0.01""",
]
ROCKETQA = dict(overwrite_output_dir=True, fine_tune_type="sft", sentence_pooling_method="cls", num_train_epochs=3,
                learning_rate=3e-5, recompute=True, passage_max_len=512, use_matryoshka=True,
                model_name_or_path="rocketqa-zh-base-query-encoder",
                output_dir="rocketqa-zh-base-query-encoder-duretrieval")
EXPECTED = [
    {**ROCKETQA, "train_data": "./data/dureader_dual.train.jsonl", "per_device_train_batch_size": 64,
     "train_group_size": 4},
    {**ROCKETQA, "train_data": "./data/dual.train.json", "per_device_train_batch_size": 32, "train_group_size": 8},
    dict(query_instruction_for_retrieval="query: ", passage_instruction_for_retrieval="",
         model_name_or_path="castorini/repllama-v1-7b-lora-passage", output_dir="repllama-v1-7b-duretrieval$",
         save_steps=100, train_data="./data/dureader_dual.train.jsonl", bf16=True, per_device_train_batch_size=1,
         gradient_accumulation_steps=32, recompute=True, train_group_size=4, learning_rate=1e-4, query_max_len=128,
         passage_max_len=4096, num_train_epochs=1, logging_steps=1, overwrite_output_dir=True,
         negatives_cross_device=True, warmup_steps=100, fine_tune_type="lora", fp16_opt_level="O2",
         sentence_pooling_method="last", sharding="stage3 offload", use_flash_attention=True, temperature=0.01),
]


def parse(args: list[str]):
    """The config `python -m dret.train ARGS` trains with: translation, then ml_collections on its own flags."""
    argv = translate(["dret.train", *args], PASSTHROUGH)
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


@pytest.mark.parametrize("index", range(len(REFERENCE)))
def test_reference_commands_set_the_fields_of_the_same_names(index, capsys):
    config = parse([*shlex.split(REFERENCE[index].replace("\\\n", " ")), "--tiny", "--max_steps", "1"])
    assert {k: config[k] for k in EXPECTED[index]} == EXPECTED[index]
    assert config.tiny and config.max_steps == 1
    unset = set(fields()) - set(EXPECTED[index]) - {"tiny", "max_steps"}
    assert all(config[k] == fields()[k] for k in unset)
    assert capsys.readouterr().err == "dret: warning: ignored --do_train (dret.train always trains)\n"


def test_every_flag_of_the_reference_is_a_field_or_ignored():
    names = {a[2:] for command in REFERENCE for a in shlex.split(command) if a.startswith("--")}
    assert names - set(fields()) == {"do_train"}


def test_styles_mix_and_the_later_wins():
    rocketqa = f"{ROOT}/ml_configs/rocketqa.py"
    config = parse(["--learning_rate", "1e-5", "--config", rocketqa, "--config.bf16=True"])  # --config may come last
    assert config.learning_rate == 1e-5 and config.bf16 and config.model_name_or_path  # rocketqa.py names a model
    assert parse(["--learning_rate", "1e-5", "--config.learning_rate=2e-5"]).learning_rate == 2e-5
    assert parse(["--config.learning_rate=2e-5", "--learning_rate=1e-5"]).learning_rate == 1e-5
    assert parse(["--bf16", "--bf16", "false"]).bf16 is False


def test_booleans_lists_and_values():
    config = parse(["--recompute", "--bf16", "0", "--use_matryoshka=yes", "--matryoshka_dims", "32", "64",
                    "--sharding", "stage3 offload", "--max_steps", "-1", "--negatives_cross_device"])
    assert config.recompute and not config.bf16 and config.use_matryoshka and config.negatives_cross_device
    assert config.matryoshka_dims == (32, 64) and config.sharding == "stage3 offload" and config.max_steps == -1
    assert parse(["--lora_target_modules", "query", "value"]).lora_target_modules == ("query", "value")
    assert translate(["p", "--recompute", "--", "--x"], PASSTHROUGH)[-3:] == ["--config.recompute=True", "--", "--x"]


@pytest.mark.parametrize("args, message", [
    (["--do_trian"], "unknown flag --do_trian (did you mean --do_train?)"),
    (["--learning_rat", "1"], "unknown flag --learning_rat (did you mean --learning_rate?)"),
    (["--recompute", "maybe"], "--recompute maybe: expected true or false"),
    (["--learning_rate"], "--learning_rate expects a value"),
    (["--output_dir", "--bf16"], "--output_dir expects a value"),
    (["--do_train", "false"], "--do_train false: dret.train always trains"),
])
def test_bad_flags(args, message):
    with pytest.raises(DretError, match="^" + message.replace("(", r"\(").replace("?)", r"\?\)")):
        translate(["dret.train", *args], PASSTHROUGH)


def test_reference_command_runs_and_a_wrong_flag_is_one_line(tmp_path):
    """The first and the decoder command as written (paths made local), tiny models, dry runs: exit 0; a typo: one line,
    exit 2."""
    data = tmp_path / "data" / "dureader_dual.train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"query": f"问题 {i}", "pos": [f"答案 {i}"], "neg": [f"别的 {i}"]}) + "\n"
                            for i in range(512)))  # 8 devices x the command's 64 queries
    command = [sys.executable, "-m", "dret.train", *shlex.split(REFERENCE[0].replace("\\\n", " ")),
               "--tiny", "true", "--max_steps", "1", "--dry_run", "true", "--data_cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dret: warning: ignored --do_train (dret.train always trains)" in result.stderr
    assert not (tmp_path / "rocketqa-zh-base-query-encoder-duretrieval" / "checkpoints").exists()
    decoder = [sys.executable, "-m", "dret.train", *shlex.split(REFERENCE[2].replace("\\\n", " ")), "--tiny", "true",
               "--model_type", "llama", "--max_steps", "1", "--dry_run", "true", "--data_cache_dir",
               str(tmp_path / "cache")]  # the decoder command: a random Llama on SmolLM2's tokenizer
    result = subprocess.run(decoder, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps of 256 queries x group 4" in result.stdout and "model llama 2 x 64" in result.stdout
    wrong = subprocess.run([*command[:3], "--use_matryoshak"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.splitlines() == [
        "dret: unknown flag --use_matryoshak (did you mean --use_matryoshka?): dret.train takes the reference's "
        "training flags (the fields of ml_configs/base.py) and --config.key=value"]
