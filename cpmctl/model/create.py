"""New checkpoints from a config, and the numbers of a config or checkpoint without its weights: the core of
`cpmctl model init` and `cpmctl model info`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cpmctl import CpmctlError
from cpmctl.model.ant import build_model, param_counts
from cpmctl.model.checkpoint import read_config, save_native
from cpmctl.model.config import canonical_name, resolve_config
from cpmctl.model.tokenizer import CPMAntTokenizer
from cpmctl.outputs import claim

MAX_INIT_PARAMS = 2e9  # larger models are initialised on the training cluster (`pretrain` with init: new)


def init_checkpoint(config: str, vocab: str | Path, out: str | Path, seed: int = 0,
                    note: Callable[[str], None] = print, force: bool = False) -> dict:
    """A randomly initialised model (the original's init) in the native format. The vocabulary decides vocab_size.
    An existing `out` not written by `model init` is refused unless `force` (cpmctl/outputs.py)."""
    output = claim(out, "model init", force=force, inputs=[vocab])
    cfg = resolve_config(config)
    tokenizer = CPMAntTokenizer(vocab)
    resized, cfg.vocab_size = cfg.vocab_size, tokenizer.vocab_size
    counts = param_counts(cfg)
    if counts["total"] > MAX_INIT_PARAMS:
        raise CpmctlError(f"{config}: {counts['total'] / 1e9:.3f}B parameters is too large to initialise here; "
                          "initialise on the training cluster")
    if resized != tokenizer.vocab_size:  # said once the model is known to be made: an error stays one line
        note(f"vocab_size {resized} -> {tokenizer.vocab_size} (from {vocab})")
    save_native(build_model(cfg, seed=seed), out, vocab=vocab, output=output)
    return {"out": str(out), "config": config, "seed": seed, **{f"params_{k}": v for k, v in counts.items()}}


def describe(path_or_name: str) -> dict:
    """Shape and parameter counts of a checkpoint (any format), a config file or a ladder name; no weights read."""
    path = Path(path_or_name)
    if path.is_file() and path.suffix == ".json":  # a config file, as `model init --config` takes
        cfg, fmt = resolve_config(path), "config"
    elif path.exists():
        cfg, fmt = read_config(path)
    else:
        cfg, fmt = resolve_config(path_or_name), "config"
    counts = param_counts(cfg)
    return {
        "path": str(path_or_name),
        "format": fmt,
        "ladder": canonical_name(path_or_name),
        "vocab_size": cfg.vocab_size,
        "dim_model": cfg.dim_model,
        "num_layers": cfg.num_layers,
        "attention_layers_kept": cfg.num_attention_kept,
        "ffn_layers_kept": cfg.num_ffn_kept,
        "num_heads": cfg.num_heads,
        "dim_head": cfg.dim_head,
        "dim_ff": cfg.dim_ff,
        "dtype": "fp16" if cfg.half else "fp32",
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_non_embedding": counts["non_embedding"],
    }
