"""`python -m dret.convert PADDLE_DIR OUT_DIR --allow_pickle [--pooling cls]`: a PaddleNLP model folder (or an HF
folder with `pytorch_model.bin`) -> an HF / sentence-transformers folder with safetensors weights, read once so
later loads need no `--allow_pickle`."""

from __future__ import annotations

import argparse
import os

from dret import hf_io, models
from dret.errors import DretError, run_command
from dret.model import Embedder
from dret.pooling import POOLING_METHODS


def convert(source: str, out: str, *, pooling: str | None, allow_pickle: bool) -> None:
    if os.path.lexists(out):  # before the weights are read
        raise DretError(f"{out} already exists: choose a new folder")
    if pooling is None:  # the model's own: NV-Embed's latent block, else [CLS]
        pooling = "latent" if models.family_of(hf_io.read_config(source)) is models.nvembed else "cls"
    Embedder.from_pretrained(source, pooling=pooling, allow_pickle=allow_pickle).save(out)
    print(f"converted {source} to {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dret.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", metavar="PADDLE_DIR", help="a PaddleNLP model folder (model_state.pdparams)")
    p.add_argument("out", metavar="OUT_DIR", help="the new HF / sentence-transformers folder")
    p.add_argument("--pooling", choices=POOLING_METHODS, default=None,
                   help="the pooling the converted folder's sentence-transformers config names (default: latent "
                        "for NV-Embed, else cls)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="read the pickled weights (a pickle can run code when loaded: only a folder you trust)")
    args = p.parse_args(argv)
    run_command(convert, args.source, args.out, pooling=args.pooling, allow_pickle=args.allow_pickle)


if __name__ == "__main__":
    main()
