"""The transformers CPM-Ant layout (`CpmAntForCausalLM`): its state-dict keys, and the tokenizer and generation files
an export carries.

- Keys: our network under the `cpmant.` prefix, the 1024 prompt rows appended to `cpmant.input_embedding.weight`,
  and `lm_head.weight`, a copy of the vocabulary rows: CPM-Ant ties its head, cpmctl's model holds no other, so a
  checkpoint whose head differs is refused (never silently re-tied).
- Pruned models: HF's block always runs both sub-blocks, `h = h + attn(h)` and `h = h + ffn(h)`. A dropped
  sub-block is written as all-zero weights: every projection is then 0, the sub-block outputs exactly 0 and the
  residual passes `h` through unchanged, which is the skip of the pruned model. `mask_modules` stays in config.json
  (transformers keeps the extra key), so reading the export back gives the pruned model again.
- The tokenizer: transformers' CpmAntTokenizer reads vocab.txt with tokenizer_config.json; it segments with
  rjieba, HMM off, where the original and cpmctl use jieba with HMM on (docs/model.md).
"""

from __future__ import annotations

import dataclasses

import torch

from cpmctl import CpmctlError
from cpmctl.model.ant import build_model
from cpmctl.model.config import CPMAntConfig

HF_PREFIX = "cpmant."  # CpmAntForCausalLM's name for the network (ours is the whole model)
HF_TOKENIZER_CONFIG = "tokenizer_config.json"


def from_hf_state_dict(state: dict, config: CPMAntConfig, source: str = "hf") -> dict:
    """HF `CpmAntForCausalLM` keys (folded) -> our keys (folded; the caller checks them against the config). The
    head must be the tied one (our model has no other), and the sub-blocks that `mask_modules` drops must hold the
    zeros `to_hf_state_dict` wrote."""
    out = {}
    for key, t in state.items():
        if key == "lm_head.weight":
            continue
        if not key.startswith(HF_PREFIX):
            raise CpmctlError(f"{source}: unexpected key {key} in HF checkpoint")
        out[key[len(HF_PREFIX) :]] = t
    emb = out.pop("input_embedding.weight", None)
    if emb is None:
        raise CpmctlError(f"{source}: missing key cpmant.input_embedding.weight")
    if emb.shape[0] != config.vocab_size + config.num_prompts:
        raise CpmctlError(
            f"{source}: cpmant.input_embedding.weight has {emb.shape[0]} rows, expected "
            f"{config.vocab_size} + {config.num_prompts}"
        )
    out["input_embedding.weight"] = emb[: config.vocab_size].clone()
    out["prompt_embedding.weight"] = emb[config.vocab_size :].clone()
    head, rows = state.get("lm_head.weight"), out["input_embedding.weight"]
    if head is not None and not torch.equal(head, rows.to(head.dtype)):
        detail = (f"max |diff| {(head.float() - rows.float()).abs().max().item():.3g}" if head.shape == rows.shape
                  else f"shape {tuple(head.shape)}")
        raise CpmctlError(f"{source}: lm_head.weight differs from the input embedding ({detail}); CPM-Ant ties its "
                          "output head and cpmctl cannot hold a separate one, so it refuses this checkpoint rather "
                          "than replace the head")
    for key in _dropped_keys(config):
        t = out.pop(key, None)
        if t is not None and bool(t.any()):
            raise CpmctlError(f"{source}: {HF_PREFIX}{key} belongs to a sub-block that mask_modules drops, but it "
                              "is not all zeros (was the exported model trained further?)")
    return out


def _shapes(config: CPMAntConfig) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}


def _dropped_keys(config: CPMAntConfig) -> list[str]:
    """The keys of the sub-blocks `mask_modules` drops: in the full layout, absent from the pruned one."""
    if not config.mask_modules:
        return []
    return sorted(set(_shapes(dataclasses.replace(config, mask_modules=[]))) - set(_shapes(config)))


def to_hf_state_dict(folded: dict, config: CPMAntConfig) -> dict:
    """Our folded keys -> HF `CpmAntForCausalLM` keys. Dropped sub-blocks become all-zero weights: with zero
    projections an attention or FFN sub-block outputs exactly 0, so HF's `h + block(h)` is the skip of the pruned
    model (tests/test_hf_interop.py checks it)."""
    out = {f"{HF_PREFIX}{k}": v for k, v in folded.items() if k not in ("input_embedding.weight", "prompt_embedding.weight")}
    if config.mask_modules:
        full = _shapes(dataclasses.replace(config, mask_modules=[]))
        dtype = folded["input_embedding.weight"].dtype
        for key in _dropped_keys(config):
            out[f"{HF_PREFIX}{key}"] = torch.zeros(full[key], dtype=dtype)
    emb = torch.cat([folded["input_embedding.weight"], folded["prompt_embedding.weight"]])
    out["cpmant.input_embedding.weight"] = emb
    out["lm_head.weight"] = folded["input_embedding.weight"].clone()
    return {k: v.contiguous() for k, v in out.items()}


def hf_tokenizer_config() -> dict:
    """tokenizer_config.json for transformers' CpmAntTokenizer (vocab.txt beside it). Its tokenization differs from
    cpmctl's and the original's on real text (rjieba with HMM off, <unk> kept): docs/model.md."""
    return {"tokenizer_class": "CpmAntTokenizer", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
            "unk_token": "<unk>", "bod_token": "<d>", "eod_token": "</d>", "line_token": "</n>",
            "space_token": "</_>", "padding_side": "left"}


def hf_generation_config() -> dict:
    """generation_config.json: cpmctl's default decoding (model/generation_config.py) where transformers can say
    it: beam size, length, and the first-step ban of eos and newline (`begin_suppress_tokens`)."""
    from cpmctl.model.generation_config import GenerationConfig
    from cpmctl.model.tokenizer import SPECIAL_TOKENS

    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    d = GenerationConfig()
    out = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"],
           "do_sample": d.decode == "sample", "num_beams": d.beam_size if d.decode == "beam" else 1,
           "max_new_tokens": d.max_new_tokens, "repetition_penalty": d.repetition_penalty}
    if d.bans_first_step:
        out["begin_suppress_tokens"] = [ids["</s>"], ids["</n>"]]
    return out
