"""Decoding speed against the memory-bandwidth bound and against transformers' CpmAntForCausalLM.generate.

Both run the same random weights (a cpmctl model converted with `checkpoint.convert(..., to="hf")`), the same
prompts and the same number of new tokens. HF is forced to produce exactly N tokens (min_new_tokens =
max_new_tokens = N, eos suppressed). cpmctl's beam search, like the original, spends one extra step scoring its last
candidates and returns up to max_new_tokens + 1 tokens: it is asked for N - 1 so that both return N
(docs/generate.md). The script checks that both produce the same ids.

The limit, measured in the same run: a decode step at batch 1 reads every weight of the blocks and the tied
30,720-row head once, so its time is at least (weight bytes per token) / (memory bandwidth). The bandwidth is that of
a plain matrix-vector product (F.linear) over one matrix of the same number of bytes (fp32), beside the plain read
(sum) and copy bandwidths of the same matrix. Printed per mode: end-to-end tokens/s (prompt pass included), the
decode rate per row ((N - 1) / (time of N tokens - time of 1 token), prompt pass excluded), its fraction of the bound,
HF's figures measured the same way, and the ratios. All timings are the best of --repeats runs, interleaved with
each other, across modes, and with the bandwidth probes, so that load from other processes hits all of them alike.
On the CPU the same figures in process CPU time are printed too (exact with --threads 1): other load disturbs them
far less.

Modes: greedy (batch 1), beam (batch 1, --beam-size beams), batch (greedy, --batch prompts of equal length, so that
HF needs no padding); --quantize adds the same rows for cpmctl's int8 modes (cpmctl/generate/quant.py; HF has no int8
peer, so their ratio is to HF fp32) and each one's speed-up over the model dtype: int8 (weight-only block linears),
int8-dynamic (int8 activations too, fbgemm), int8-dynamic-head (and the tied head), and, measured only here,
int8+head (weight-only blocks and a weight-only int8 head), and int4 (weight-only, groups of 128 inputs,
cpmctl/generate/int4.py). Before timing, each quantized mode's quality against the
model dtype: teacher-forced over --quality-tokens random tokens (max |logit diff|, relative logit error, top-1
agreement, perplexity) and the fraction of greedy ids equal to the model dtype's, on the bench model and on a small
model trained for --quality-train steps on a Markov chain (random weights give nearly flat logits, where any
rounding flips ties); after timing, the same fraction for the timed runs.

    python bench/generate.py                                  # ~109M parameters, CPU fp32 + the int8 modes
    python bench/generate.py --threads 1 --workloads 32:64 --modes greedy --repeats 5
    python bench/generate.py --threads 1 --workloads 32:32 --modes greedy,batch --repeats 3
    python bench/generate.py --device cuda --dtype bf16 --workloads 32:128,256:128 --quantize none
    python bench/generate.py --threads 1 --dispatch            # per-step dispatch: forward vs generate/step.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmctl.generate.decode import beam_search, greedy  # noqa: E402
from cpmctl.generate.packed import PackedLinear, pack_linears, packing_applies, use_output_head  # noqa: E402
from cpmctl.generate.quant import quantize_model, use_int8_head  # noqa: E402
from cpmctl.model.ant import build_model, param_counts  # noqa: E402
from cpmctl.model.checkpoint import convert, save_native  # noqa: E402
from cpmctl.model.config import CPMAntConfig  # noqa: E402
from cpmctl.model.generation_config import GenerationConfig  # noqa: E402
from cpmctl.model.inputs import build_inputs  # noqa: E402
from cpmctl.model.tokenizer import BOS, EOS  # noqa: E402


INT8_MODES = ("int8", "int8-dynamic", "int8-dynamic-head", "int8+head")
QUANT_MODES = INT8_MODES + ("int4",)
GREEDY_PROMPTS, GREEDY_TOKENS = 4, 32  # the quality check's greedy decoding


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim-model", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=12)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--dim-ff", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=30720)
    p.add_argument("--workloads", default="32:64,256:64", help="PROMPT_TOKENS:NEW_TOKENS pairs, comma-separated.")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="Prompts decoded together in the `batch` mode.")
    p.add_argument("--modes", default="greedy,beam,batch")
    p.add_argument("--quantize", default="none," + ",".join(QUANT_MODES),
                   help=f"Comma-separated: none (the model dtype, as generate loads it: oneDNN-packed linears on "
                        f"the CPU), blas (the same through torch.mm), {', '.join(QUANT_MODES)}.")
    p.add_argument("--quality-train", type=int, default=100,
                   help="Steps of the trained model of the quality check (0: random weights only).")
    p.add_argument("--quality-tokens", type=int, default=256,
                   help="Teacher-forced tokens of the quality check; 0: none.")
    p.add_argument("--repeats", type=int, default=2, help="Timed runs per contender after one warm-up; best kept.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object per measurement.")
    p.add_argument("--dispatch", action="store_true",
                   help="Only the per-step dispatch cost: a 12-layer model 64 wide, forward vs generate/step.py.")
    return p.parse_args()


@torch.no_grad()
def dispatch_cost(steps: int = 16, repeats: int = 15) -> None:
    """CPU ms per decode step of a model with no arithmetic to speak of (12 layers, dim 64, vocab 1024): what the
    per-op dispatch of a step costs, through CPMAnt.forward and through DecodeStep, interleaved, best of `repeats`."""
    from cpmctl.generate.decode import _prefill, _step_inputs
    from cpmctl.generate.step import DecodeStep

    config = CPMAntConfig(vocab_size=1024, dim_model=64, dim_ff=128, num_layers=12, num_heads=2, dim_head=32,
                          half=False)
    model = build_model(config, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 8):
        inputs = build_inputs(model, [[BOS] + torch.randint(10, 1000, (32,), generator=gen).tolist()] * rows)
        segment, context, span = _step_inputs(rows, "cpu")
        fast = DecodeStep(model)
        fns = {"forward": lambda c, t: model(t[:, None], segment, context, span, cache=c)[:, -1],
               "DecodeStep": lambda c, t: fast(c, t, segment, context, span)}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(repeats):
            for name, fn in fns.items():
                logits, cache = _prefill(model, inputs, steps + 1)
                tokens = logits.argmax(-1)
                start = time.process_time()
                for _ in range(steps):
                    tokens = fn(cache, tokens).argmax(-1)
                best[name] = min(best[name], (time.process_time() - start) / steps)
        print(f"dispatch, batch {rows}: " + ", ".join(f"{k} {v * 1e3:.2f} ms CPU a step" for k, v in best.items()))


# ----- timing ---------------------------------------------------------------------------------------------------
def measure(fn, device):
    """(wall seconds, process CPU seconds, result, peak CUDA bytes or None) of one run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return wall, cpu, result, peak


class Best:
    """The best (wall, CPU) seconds of each named run, and its last result."""

    def __init__(self):
        self.wall, self.cpu, self.result, self.peak = {}, {}, {}, {}

    def run(self, name, fn, device):
        wall, cpu, self.result[name], self.peak[name] = measure(fn, device)
        self.wall[name] = min(self.wall.get(name, float("inf")), wall)
        self.cpu[name] = min(self.cpu.get(name, float("inf")), cpu)


# ----- the limit ------------------------------------------------------------------------------------------------
def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer of the blocks and the final norm (fp32
    or int8 + scales), and the tied head (the whole input embedding). The embedding lookups and the position-bias
    table read a few rows only and are left out."""
    head = getattr(model, "output_head", None)  # an int8 or packed head replaces the embedding in the logits product
    head_tensors = list(head.buffers()) if head is not None else [model.input_embedding.weight]
    seen, total = set(), 0
    for t in list(model.encoder.parameters()) + list(model.encoder.buffers()) + head_tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    # int8-dynamic's packed weights are opaque fbgemm objects, not buffers
    modules = list(model.encoder.modules()) + ([head] if head is not None else [])
    return total + sum(getattr(m, "packed_weight_bytes", 0) for m in modules)


class Bandwidth:
    """Memory bandwidth probes over one matrix of `nbytes` (dim columns, `dtype`): a matrix-vector product, a read
    (sum) and a copy. Bytes per second, best of the calls so far."""

    def __init__(self, nbytes: int, dim: int, device, dtype):
        rows = max(1, nbytes // (dim * torch.empty((), dtype=dtype).element_size()))
        gen = torch.Generator().manual_seed(0)
        self.matrix = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
        self.vector = torch.randn(1, dim, generator=gen).to(device=device, dtype=dtype)
        self.copy_target = torch.empty_like(self.matrix)
        self.nbytes = self.matrix.numel() * self.matrix.element_size()
        self.device = device
        # The same product through oneDNN's packed layout (what generation uses on the CPU): the faster of the two
        # kernels is the bound's bandwidth.
        self.packed = PackedLinear(self.matrix) if packing_applies(device, dtype) else None
        self.best = Best()

    def probe(self):
        self.best.run("gemv", lambda: F.linear(self.vector, self.matrix), self.device)
        if self.packed is not None:
            self.best.run("gemv-onednn", lambda: self.packed(self.vector), self.device)
        self.best.run("read", lambda: self.matrix.sum(), self.device)
        self.best.run("copy", lambda: self.copy_target.copy_(self.matrix), self.device)

    def kernels(self) -> str:
        """' (BLAS x, oneDNN y)' where both gemv kernels were probed."""
        if "gemv-onednn" not in self.best.wall:
            return ""
        blas, onednn = (self.nbytes / self.best.wall[n] / 1e9 for n in ("gemv", "gemv-onednn"))
        return f" (BLAS {blas:.2f}, oneDNN {onednn:.2f})"

    def rate(self, name: str, clock: str = "wall") -> float:
        """Bytes per second of probe `name`; "gemv" is the faster of the BLAS and the oneDNN products."""
        times = self.best.wall if clock == "wall" else self.best.cpu
        seconds = min(times[n] for n in (name, name + "-onednn") if n in times)
        moved = 2 * self.nbytes if name == "copy" else self.nbytes
        return moved / seconds


# ----- the contenders -------------------------------------------------------------------------------------------
def decode_fns(mode, ours, hf, texts, n, beam_size, device):
    """(run cpmctl, run HF) producing the new ids of every prompt, for `n` new tokens."""
    hf_input = torch.tensor(texts, device=device)
    if mode in ("greedy", "batch"):
        cfg = GenerationConfig(decode="greedy", max_new_tokens=n)
        hf_kwargs = dict(num_beams=1)
        decode = greedy
    elif mode == "beam":
        # No first-step ban here, so that HF (which has none) can take the same path.
        cfg = GenerationConfig(decode="beam", beam_size=beam_size, max_new_tokens=max(1, n - 1), ban_first_step=False)
        hf_kwargs = dict(num_beams=beam_size, length_penalty=1.0, early_stopping=False)
        decode = beam_search
    else:
        raise SystemExit(f"unknown mode {mode}")

    def run_ours():
        return decode(ours, build_inputs(ours, texts), cfg)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(hf_input, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=EOS,
                              pad_token_id=0, **hf_kwargs)
        return out[:, len(texts[0]):].tolist()

    return run_ours, run_hf


def main():
    args = parse_args()
    warnings.filterwarnings("ignore")
    from transformers import CpmAntForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dispatch:
        return dispatch_cost()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = CPMAntConfig(
        vocab_size=args.vocab_size, dim_model=args.dim_model, dim_ff=args.dim_ff, num_layers=args.num_layers,
        num_heads=args.num_heads, dim_head=args.dim_head, half=False,
    )
    counts = param_counts(config)
    ours = build_model(config, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_native(ours, Path(tmp) / "native")
        convert(Path(tmp) / "native", "hf", Path(tmp) / "hf")
        hf = CpmAntForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype)
    # The export's generation_config.json holds cpmctl's default decoding; every setting is passed explicitly below.
    hf.generation_config = HFGenerationConfig()
    ours = ours.to(device=device, dtype=dtype).eval()
    hf = hf.to(device).eval()
    models = {}
    for q in args.quantize.split(","):
        if q == "none":  # as `cpmctl generate` loads it: on the CPU, the linears in oneDNN's packed layout
            models[args.dtype] = ours
            if packing_applies(device, dtype):
                models[args.dtype] = copy.deepcopy(ours)
                pack_linears(models[args.dtype])
        elif q == "blas":  # the linears through torch.mm (the BLAS), as CPMCTL_CPU_LINEAR=blas
            models[args.dtype + "-blas"] = ours
        elif q == "int8+head":  # weight-only int8 blocks and head: the head in aten._weight_int8pack_mm too
            models[q] = quantize_model(copy.deepcopy(ours))
            use_int8_head(models[q], activations=False)
        elif q in QUANT_MODES:
            models[q] = quantize_model(copy.deepcopy(ours), q)
            if q != "int8-dynamic-head" and packing_applies(device, dtype):  # generate's fp32 head, packed on the CPU
                use_output_head(models[q], PackedLinear(models[q].input_embedding.weight))
        else:
            raise SystemExit(f"unknown --quantize {q}")
    cpu_clock = device.type == "cpu"
    print(f"model: {counts['total'] / 1e6:.1f}M parameters ({config.num_layers} layers, dim {config.dim_model}, "
          f"vocab {config.vocab_size}); {args.device} {args.dtype}, threads {torch.get_num_threads()}")
    per_token = {name: weight_bytes_per_token(m) for name, m in models.items()}
    fp_bytes = weight_bytes_per_token(ours)
    bandwidth = Bandwidth(fp_bytes, config.dim_model, device, dtype)
    print("weights read per decode step: " + ", ".join(f"{name} {b / 1e6:.1f} MB" for name, b in per_token.items()))

    if args.quality_tokens > 0 and args.dtype in models and len(models) > 1:
        quality(models, args.dtype, config, args.quality_tokens, args.seed, device)
    if args.quality_train > 0 and len(models) > 1:
        trained_quality([q for q in args.quantize.split(",") if q != "none"], args.quality_train, args.seed)

    gen = torch.Generator().manual_seed(args.seed + 1)
    for workload in args.workloads.split(","):
        prompt_tokens, n = (int(x) for x in workload.split(":"))
        prompts = [[BOS] + torch.randint(10, min(args.vocab_size, 30000), (prompt_tokens,), generator=gen).tolist()
                   for _ in range(args.batch)]
        # Every mode's runs are interleaved in one loop (not mode after mode), so that load from other processes
        # hits batch 1 and batch 8 alike and their ratio holds.
        runs = {}
        for mode in args.modes.split(","):
            texts = prompts if mode == "batch" else prompts[:1]
            fns = {}
            for name, model in models.items():
                fns[name], fns["hf"] = decode_fns(mode, model, hf, texts, n, args.beam_size, device)
                fns[name + "@1"], fns["hf@1"] = decode_fns(mode, model, hf, texts, 1, args.beam_size, device)
            for fn in fns.values():  # warm-up
                fn()
            runs[mode] = (texts, fns, Best())
        bandwidth.probe()
        for _ in range(max(1, args.repeats)):
            for texts, fns, best in runs.values():
                bandwidth.probe()
                for name, fn in fns.items():
                    best.run(name, fn, device)
        done = {}
        for mode, (texts, _, best) in runs.items():
            rows = len(texts) * (args.beam_size if mode == "beam" else 1)
            done[mode] = report(args, mode, texts, n, rows, best, bandwidth, per_token, fp_bytes, cpu_clock)
        if "batch" in done and "greedy" in done:
            for name in per_token:
                one, many = done["greedy"][name], done["batch"][name]
                print(f"batch {many['batch']} / batch 1 greedy, {name}: "
                      f"{many['batch'] * many['cpmctl_decode_steps_per_s']:.2f} / "
                      f"{one['cpmctl_decode_steps_per_s']:.2f} decode tok/s = "
                      f"{many['batch'] * many['cpmctl_decode_steps_per_s'] / one['cpmctl_decode_steps_per_s']:.2f}x "
                      f"(end to end {many['cpmctl_tokens_per_s'] / one['cpmctl_tokens_per_s']:.2f}x; hf "
                      f"{many['hf_tokens_per_s'] / one['hf_tokens_per_s']:.2f}x)")


# ----- quality ------------------------------------------------------------------------------------------------
@torch.no_grad()
def quality(models, reference_name, config, tokens, seed, device):
    """Each quantized model against the model dtype, teacher-forced over one sequence of random tokens: max |logit
    diff|, relative logit error (Frobenius), top-1 agreement and perplexity of the sequence's own next tokens."""
    gen = torch.Generator().manual_seed(seed + 2)
    ids = [[BOS] + torch.randint(10, min(config.vocab_size, 30000), (tokens,), generator=gen).tolist()]
    reference = models[reference_name]
    inputs = build_inputs(reference, ids)
    args = [inputs[k].to(device) for k in ("input", "segment", "context", "span")]
    target = torch.tensor(ids[0][1:], device=device)

    def logits_of(model):
        return model(*args)[0, -len(ids[0]):-1].float()  # the rows that predict tokens 1..n of the sequence

    base = logits_of(reference)
    base_ppl = torch.exp(F.cross_entropy(base, target)).item()
    prompts = [[BOS] + torch.randint(10, min(config.vocab_size, 30000), (16,), generator=gen).tolist()
               for _ in range(GREEDY_PROMPTS)]
    greedy_cfg = GenerationConfig(decode="greedy", max_new_tokens=GREEDY_TOKENS)
    base_ids = greedy(reference, build_inputs(reference, prompts), greedy_cfg)
    print(f"quality vs {reference_name}, teacher-forced over {tokens} random tokens (random weights: the perplexity "
          f"itself means nothing, its change does; {reference_name} perplexity {base_ppl:.1f}, "
          f"{base.argmax(-1).unique().numel()} distinct top-1 ids, logit spread per row "
          f"{(base.amax(-1) - base.amin(-1)).mean().item():.3f}); greedy: {GREEDY_PROMPTS} prompts x {GREEDY_TOKENS} "
          "new tokens decoded together")
    for name, model in models.items():
        if model is reference:
            continue
        out = logits_of(model)
        ppl = torch.exp(F.cross_entropy(out, target)).item()
        print(f"  {name:17s}: max |logit diff| {(out - base).abs().max().item():.4f} (logits up to "
              f"{base.abs().max().item():.2f}), relative error {((out - base).norm() / base.norm()).item():.4f}, top-1 "
              f"agreement {(out.argmax(-1) == base.argmax(-1)).float().mean().item():.3f}, perplexity {ppl:.1f} "
              f"({100 * (ppl / base_ppl - 1):+.2f}%); greedy ids equal "
              f"{same_ids_fraction(greedy(model, build_inputs(model, prompts), greedy_cfg), base_ids):.3f}")


def trained_quality(modes: list[str], steps: int, seed: int) -> None:
    """The same quality figures on a small model first trained (`steps` AdamW steps, causal LM) on a sparse Markov
    chain (tests/synthetic.py), whose logits are peaked as a real model's are, unlike random weights'."""
    from tests.synthetic import markov_documents

    config = CPMAntConfig(vocab_size=2048, dim_model=256, dim_ff=640, num_layers=4, num_heads=4, dim_head=64,
                          half=False)
    model = build_model(config, seed=seed)
    docs = markov_documents(config.vocab_size, 16 * steps + 16, 64, seed=seed, words=400)

    def causal(rows):
        """Inputs for [<s>] + row: every token after <s> to predict (seen causally), as generated tokens are."""
        inputs = build_inputs(model, [[BOS] + r.tolist() for r in rows])
        inputs["context"][:, -len(rows[0]):] = False
        return [inputs[k] for k in ("input", "segment", "context", "span")], torch.as_tensor(np.stack(rows))

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        args, ids = causal(docs[16 * step: 16 * step + 16])
        loss = F.cross_entropy(model(*args)[:, -ids.shape[1]:-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    held_out = docs[-16:]
    args, ids = causal(held_out)
    models = {"fp32": model}
    for q in modes:
        models[q] = copy.deepcopy(model)
        if q == "int8+head":
            quantize_model(models[q])
            use_int8_head(models[q], activations=False)
        else:
            quantize_model(models[q], q)
    prompts = [[BOS] + d[:16].tolist() for d in held_out[:GREEDY_PROMPTS]]
    greedy_cfg = GenerationConfig(decode="greedy", max_new_tokens=GREEDY_TOKENS)
    with torch.no_grad():
        base = model(*args)[:, -ids.shape[1]:-1].float()
        base_ppl = torch.exp(F.cross_entropy(base.flatten(0, 1), ids[:, 1:].flatten())).item()
        base_ids = greedy(model, build_inputs(model, prompts), greedy_cfg)
        print(f"quality on a trained model ({param_counts(config)['total'] / 1e6:.1f}M parameters, {steps} steps on "
              f"a Markov chain, last loss {loss.item():.2f}), teacher-forced over 16 held-out rows of 64 tokens: fp32 "
              f"perplexity {base_ppl:.2f}, logit spread per row {(base.amax(-1) - base.amin(-1)).mean().item():.1f}")
        for name, m in models.items():
            if m is model:
                continue
            out = m(*args)[:, -ids.shape[1]:-1].float()
            ppl = torch.exp(F.cross_entropy(out.flatten(0, 1), ids[:, 1:].flatten())).item()
            print(f"  {name:17s}: max |logit diff| {(out - base).abs().max().item():.4f}, relative error "
                  f"{((out - base).norm() / base.norm()).item():.4f}, top-1 agreement "
                  f"{(out.argmax(-1) == base.argmax(-1)).float().mean().item():.4f}, perplexity {ppl:.3f} "
                  f"({100 * (ppl / base_ppl - 1):+.2f}%); greedy ids equal "
                  f"{same_ids_fraction(greedy(m, build_inputs(m, prompts), greedy_cfg), base_ids):.3f}")


def same_ids_fraction(ids, reference) -> float:
    """Fraction of positions where two id lists (one per row) agree."""
    pairs = [(a, b) for row, ref in zip(ids, reference) for a, b in zip(row, ref)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def report(args, mode, texts, n, rows, best, bandwidth, per_token, fp_bytes, cpu_clock) -> dict:
    """Print the figures of one mode (and return them per weight kind)."""
    hf_ids = best.result["hf"]
    new_tokens = sum(len(r) for r in hf_ids)
    gemv = bandwidth.rate("gemv")
    print(f"\n{mode} (batch {len(texts)}{f', {args.beam_size} beams' if mode == 'beam' else ''}), prompt "
          f"{len(texts[0])} tokens, {n} new: bandwidth gemv {gemv / 1e9:.2f} GB/s{bandwidth.kernels()}, read "
          f"{bandwidth.rate('read') / 1e9:.2f} GB/s, copy {bandwidth.rate('copy') / 1e9:.2f} GB/s (wall, best of run)")

    def figures(name, clock):
        times = best.wall if clock == "wall" else best.cpu
        ids = best.result[name]
        produced = sum(len(r) for r in ids)
        end_to_end = produced / times[name]
        # Decode steps between the run of n tokens and the run of 1 (one step advances every row by a token). Our
        # beam search was asked for n - 1 and 1 tokens: n and 2 steps.
        steps = n - 2 if (mode == "beam" and name != "hf") else n - 1
        step = (times[name] - times[name + "@1"]) / max(steps, 1)
        return produced, end_to_end, (1.0 / step if step > 0 else float("nan"))

    _, hf_e2e, hf_decode = figures("hf", "wall")
    base, rows_out = None, {}
    for name, nbytes in per_token.items():
        produced, e2e, decode_rate = figures(name, "wall")
        bound = gemv / nbytes  # decode steps per second at the bandwidth limit
        same = best.result[name] == hf_ids
        row = {
            "mode": mode, "weights": name, "batch": len(texts), "rows": rows, "prompt_tokens": len(texts[0]),
            "new_tokens": n, "device": args.device, "threads": torch.get_num_threads(),
            "weight_bytes_per_token": nbytes, "gemv_gb_s": round(gemv / 1e9, 3),
            "read_gb_s": round(bandwidth.rate("read") / 1e9, 3), "copy_gb_s": round(bandwidth.rate("copy") / 1e9, 3),
            "bound_steps_per_s": round(bound, 2), "cpmctl_tokens_per_s": round(e2e, 2),
            "cpmctl_decode_steps_per_s": round(decode_rate, 2), "fraction_of_bound": round(decode_rate / bound, 3),
            "hf_tokens_per_s": round(hf_e2e, 2), "hf_decode_steps_per_s": round(hf_decode, 2),
            "hf_fraction_of_bound": round(hf_decode / (gemv / fp_bytes), 3),
            "ratio": round(e2e / hf_e2e, 3), "decode_ratio": round(decode_rate / hf_decode, 3),
            "new_tokens_cpmctl": produced, "new_tokens_hf": new_tokens, "same_ids": same,
        }
        if cpu_clock:
            _, e2e_c, dec_c = figures(name, "cpu")
            _, hf_e2e_c, hf_dec_c = figures("hf", "cpu")
            bound_c = bandwidth.rate("gemv", "cpu") / nbytes
            row.update(cpu_fraction_of_bound=round(dec_c / bound_c, 3), cpu_time_ratio=round(e2e_c / hf_e2e_c, 3),
                       cpu_decode_ratio=round(dec_c / hf_dec_c, 3))
        else:
            row.update(cpmctl_peak_mib=round(best.peak[name] / 2**20, 1), hf_peak_mib=round(best.peak["hf"] / 2**20, 1))
        if base is None:
            base = row
        else:
            row["speedup_vs_" + base["weights"]] = round(decode_rate / base["cpmctl_decode_steps_per_s"], 3)
        hf_part = (f"hf {hf_e2e:7.2f} tok/s (decode {hf_decode:6.2f} steps/s, {row['hf_fraction_of_bound']:.2f} of "
                   f"the fp32 bound): ratio {row['ratio']:.2f}x, decode {row['decode_ratio']:.2f}x")
        print(f"  cpmctl {name:17s}: {nbytes / 1e6:6.1f} MB/step, bound {bound:6.2f} steps/s; {e2e:7.2f} tok/s, decode "
              f"{decode_rate:6.2f} steps/s = {row['fraction_of_bound']:.2f} of the bound; {hf_part}"
              + (f"; {row['speedup_vs_' + base['weights']]:.2f}x {base['weights']}" if row is not base else ""))
        if cpu_clock:
            print(f"    CPU time: {row['cpu_fraction_of_bound']:.2f} of the bound, ratio {row['cpu_time_ratio']:.2f}x, "
                  f"decode {row['cpu_decode_ratio']:.2f}x")
        quantized = name in QUANT_MODES
        if quantized and args.dtype in best.result:
            row["same_ids_as_" + args.dtype] = round(same_ids_fraction(best.result[name], best.result[args.dtype]), 3)
        equal = f"; {row['same_ids_as_' + args.dtype]:.3f} of them equal to {args.dtype}'s" if quantized and (
            "same_ids_as_" + args.dtype) in row else ""
        note = "same ids" if same else (f"ids differ ({name} rounds{equal})" if quantized else "IDS DIFFER")
        print(f"    tokens {produced}/{new_tokens}: {note}")
        if not same and not quantized and name != "fp32":
            print("    half precision: the two round differently, so long paths may part; in fp32 they must not")
        rows_out[name] = row
        if args.json:
            print(json.dumps(row))
    return rows_out


if __name__ == "__main__":
    main()
