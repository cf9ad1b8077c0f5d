"""`cpmctl data ...`: tokenize (and the data pipeline commands)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from cpmctl import CpmctlError
from cpmctl.cli.common import emit_json, out, require_file
from cpmctl.model.tokenizer import CPMAntTokenizer

app = typer.Typer(help="Tokenize, filter, deduplicate, build vocabularies and pack training data.", no_args_is_help=True)


@app.command()
def tokenize(
    text: str = typer.Argument(..., help="Text to tokenize, or '-' to read stdin."),
    vocab: Path = typer.Option(..., "--vocab", help="Vocabulary file."),
    json_out: bool = typer.Option(False, "--json", help='Print {"text", "ids", "pieces"}.'),
):
    """Token ids and pieces of a text, exactly as the original tokenizer produces them."""
    if text == "-":
        text = sys.stdin.read()
    if text == "":
        raise CpmctlError("empty text")
    tok = CPMAntTokenizer(require_file(vocab, "vocab file"))
    ids = tok.encode(text)
    pieces = [tok.id_to_token[i] for i in ids]
    if json_out:
        emit_json({"text": text, "ids": ids, "pieces": pieces})
    else:
        out.print(" ".join(str(i) for i in ids))
        out.print(" ".join(pieces), markup=False)
