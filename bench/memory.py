"""Generation within a memory budget: cpmctl's layer streaming against the fully resident model and against
accelerate's offloading (`infer_auto_device_map` + `dispatch_model` with the same max memory), on the same weights,
with the same greedy decode (decode.greedy); then int8 weights against the model dtype, with their effect on quality.

Every contender's greedy ids are compared with the resident model's. Decoding speed is (new tokens - 1) divided by
the time of a full greedy run minus the time of a 1-token run (the prefill), best of --repeats. Peak memory is
torch.cuda.max_memory_allocated on a GPU (from before loading to the end of decoding); on the CPU it is the bytes
of weights materialized at once (cpmctl: measured from the tensors at every block; accelerate: the weights it keeps
in memory plus its largest offloaded leaf, the rest being offloaded to disk).

    python bench/memory.py                                    # CPU, ~100M parameters, budget = 50% of the weights
    python bench/memory.py --device cuda --config 3b --dtype fp16 --limit 4 --new-tokens 32
    python bench/memory.py --checkpoint DIR --text FILE       # real weights; int8 perplexity on a real text

With no --checkpoint, the weights are random (original init), with the </s> row of the embedding zeroed so that
every contender generates exactly --new-tokens tokens; the int8 quality numbers on random weights measure the
numerical effect only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpmctl.generate.decode import greedy
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs  # noqa: E402
from cpmctl.generate.offload import describe_plan, load_offloaded, materialized_weight_bytes  # noqa: E402
from cpmctl.generate.plan import GB  # noqa: E402
from cpmctl.generate.quant import quantize_model  # noqa: E402
from cpmctl.model.ant import build_model, param_counts  # noqa: E402
from cpmctl.model.checkpoint import NATIVE_WEIGHTS, load_model, read_config  # noqa: E402
from cpmctl.model.config import CPMAntConfig, resolve_config  # noqa: E402
from cpmctl.model.tokenizer import BOS, EOS  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="Ladder name (3b, 10b, mini-10b) instead of the --dim-* flags.")
    p.add_argument("--checkpoint", default=None, help="Use this native/original checkpoint instead of random weights.")
    p.add_argument("--dim-model", type=int, default=1024)
    p.add_argument("--dim-ff", type=int, default=2560)
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=16)
    p.add_argument("--dim-head", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--limit", type=float, default=None,
                   help="Memory limit in GB (default: 50%% of the weights on the CPU; required on a GPU).")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="Timed runs per measurement; the best is kept.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--contenders", default="resident,cpmctl,cpmctl-int8,accelerate,resident-int8",
                   help="Comma list of: resident, cpmctl, cpmctl-int8, accelerate, naive, resident-int8.")
    p.add_argument("--text", default=None,
                   help="Text file for the int8 perplexity (needs vocab.txt beside --checkpoint).")
    p.add_argument("--no-quality", action="store_true", help="Skip the int8 quality measurement.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Also print one JSON object per contender.")
    return p.parse_args()


# ----- weights -------------------------------------------------------------------------------------------------
@torch.no_grad()
def write_random_checkpoint(config: CPMAntConfig, out: Path, dtype: torch.dtype, device: torch.device, seed: int):
    """Original-convention random weights (std 1, norms 1), generated on `device` (fast on a GPU), saved native."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in build_model(config, device="meta").named_parameters():
        if "layernorm" in name:
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(dtype).cpu()
        state[name] = t
    state["input_embedding.weight"][EOS] = 0  # </s> never wins: every contender decodes exactly --new-tokens
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.json")
    save_file(state, str(out / NATIVE_WEIGHTS), metadata={"format": "cpmctl-native", "convention": "original"})
    return out


# ----- measuring -----------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def decode(model, prompt: list[int], new_tokens: int, device, repeats: int) -> tuple[list[int], float, float]:
    """Greedy ids, the best wall time of `repeats` runs for `new_tokens` tokens and for 1 token (= the prefill),
    after a 2-token warm-up. Decoding speed is (new_tokens - 1) / (t_new - t_1)."""
    inputs = build_inputs(model, [prompt])
    greedy(model, inputs, GenerationConfig(decode="greedy", max_new_tokens=2))

    def best(n):
        times, ids = [], None
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            ids = greedy(model, inputs, GenerationConfig(decode="greedy", max_new_tokens=n))[0]
            sync(device)
            times.append(time.perf_counter() - start)
        return ids, min(times)

    _, t1 = best(1)
    ids, tn = best(new_tokens)
    return ids, tn, t1


def measure_at_blocks(model, streamer=None) -> list[int]:
    """Record the bytes of weights materialized at every block's first sub-block (after any offloading hook has
    brought the block's weights in)."""
    measured = [materialized_weight_bytes(model, streamer)]
    for block in model.encoder.layers:
        first = block.self_att if block.self_att is not None else block.ffn
        if first is not None:
            first.register_forward_pre_hook(lambda m, a: measured.append(materialized_weight_bytes(model, streamer)))
    return measured


def peak_bytes(device, cpu_bytes: int) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_bytes


# ----- contenders ----------------------------------------------------------------------------------------------
def run_resident(path, args, device, dtype, prompt, int8=False):
    fresh(device)
    start = time.perf_counter()
    model, _ = load_model(path, device=device, dtype=dtype)
    if int8:
        model = quantize_model(model)
    load_s = time.perf_counter() - start
    ids, secs, prefill_s = decode(model, prompt, args.new_tokens, device, args.repeats)
    weights = materialized_weight_bytes(model)
    result = dict(load_s=load_s, ids=ids, seconds=secs, prefill_s=prefill_s, peak=peak_bytes(device, weights),
                  note="all resident")
    del model
    return result


def run_cpmctl(path, args, device, dtype, prompt, budget, int8=False):
    fresh(device)
    start = time.perf_counter()
    rows, prefill = 1, 32 + len(prompt)
    loaded = load_offloaded(path, device=device, dtype=dtype, budget=budget, quantize="int8" if int8 else None,
                            batch_rows=rows, prefill_length=prefill, capacity=prefill + args.new_tokens + 3)
    load_s = time.perf_counter() - start
    measured = measure_at_blocks(loaded.model, loaded.streamer) if device.type == "cpu" else [0]
    ids, secs, prefill_s = decode(loaded.model, prompt, args.new_tokens, device, args.repeats)
    plan = loaded.plan
    result = dict(load_s=load_s, ids=ids, seconds=secs, prefill_s=prefill_s, peak=peak_bytes(device, max(measured)),
                  note=describe_plan(plan), planned=plan.charged_bytes, streamed_gb_per_token=plan.streamed_bytes / GB,
                  streamed_blocks=len(plan.streamed))
    loaded.close()
    del loaded
    return result


def run_accelerate(path, args, device, dtype, prompt, budget, offload_dir: Path):
    """accelerate's big-model inference on the same (folded) weights: the device map gets `budget` bytes on the
    device (on the CPU: in memory, the rest offloaded to disk), the rest is offloaded and copied in per forward."""
    from accelerate import dispatch_model, infer_auto_device_map

    fresh(device)
    start = time.perf_counter()
    model, _ = load_model(path, device="cpu", dtype=dtype)
    if device.type == "cuda":
        max_memory = {device.index or 0: budget, "cpu": 10**15}
        main = device.index or 0
    else:
        max_memory = {"cpu": budget}
        main = "cpu"
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=["TransformerBlock"],
                                       dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dispatch_model(model, device_map=device_map, main_device=main, offload_dir=str(offload_dir))
    load_s = time.perf_counter() - start
    placed = {}
    for v in device_map.values():
        placed[str(v)] = placed.get(str(v), 0) + 1
    measured = measure_at_blocks(model) if device.type == "cpu" else [0]
    # accelerate brings offloaded weights in per leaf module, inside its forward, where no hook can see them:
    # count the largest offloaded leaf as in flight.
    in_flight = max((p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta"), default=0)
    ids, secs, prefill_s = decode(model, prompt, args.new_tokens, device, args.repeats)
    result = dict(load_s=load_s, ids=ids, seconds=secs, prefill_s=prefill_s,
                  peak=peak_bytes(device, max(measured) + in_flight), note=f"device_map entries {placed}")
    del model
    return result


def run_naive(path, args, device, dtype, prompt, budget):
    """A synchronous streaming baseline (when accelerate is missing): blocks that do not fit live on the CPU and are
    moved to the device before their forward and back after it."""
    fresh(device)
    model, _ = load_model(path, device="cpu", dtype=dtype)
    for name in ("input_embedding", "prompt_embedding", "segment_embedding", "position_bias"):
        getattr(model, name).to(device)
    model.encoder.output_layernorm.to(device)
    used = materialized_weight_bytes(model) if device.type == "cuda" else 0
    for block in model.encoder.layers:
        size = sum(p.numel() * p.element_size() for p in block.parameters())
        if used + 2 * size <= budget:
            block.to(device)
            used += size
        else:
            block.register_forward_pre_hook(lambda m, a: m.to(device))
            block.register_forward_hook(lambda m, a, o: m.to("cpu"))
    measured = measure_at_blocks(model) if device.type == "cpu" else [0]
    ids, secs, prefill_s = decode(model, prompt, args.new_tokens, device, args.repeats)
    result = dict(load_s=0.0, ids=ids, seconds=secs, prefill_s=prefill_s, peak=peak_bytes(device, max(measured)),
                  note="synchronous .to()")
    del model
    return result


# ----- int8 kernels -------------------------------------------------------------------------------------------
@torch.no_grad()
def copy_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second of one copy of `nbytes` into `device` memory, best of `repeats`: from pinned host memory
    on CUDA (what a streamed block's copy is), memory to memory on the CPU (a streamed block is folded from the
    mapped checkpoint's pages into its buffer: a read and a write of every byte)."""
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for i in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return nbytes / best


def int8_kernel_times(config: CPMAntConfig, device, dtype, repeats: int = 50) -> dict:
    """Milliseconds of one decoding-step matmul (1 row) with the largest linear of the config: the model dtype,
    aten._weight_int8pack_mm, and dequantize-then-matmul."""
    from cpmctl.generate.quant import quantize_weight, scale_dtype

    n, k = config.dim_ff, config.dim_model
    weights = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for _ in range(8)]  # > caches
    act = scale_dtype(device, dtype)
    packed = [quantize_weight(w, act) for w in weights]
    x = torch.randn(1, k, device=device, dtype=dtype)
    xa = x.to(act)

    def time_ms(fn):
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        return (time.perf_counter() - start) / repeats / len(weights) * 1e3

    return {
        "dense": time_ms(lambda: [F.linear(x, w) for w in weights]),
        "int8pack": time_ms(lambda: [torch.ops.aten._weight_int8pack_mm(xa, q, s) for q, s in packed]),
        "dequant": time_ms(lambda: [F.linear(xa, q.to(act) * s[:, None]) for q, s in packed]),
    }


# ----- int8 quality --------------------------------------------------------------------------------------------
@torch.no_grad()
def int8_quality(path, device, dtype, tokens: list[int]) -> dict:
    """Teacher-forced logits over `tokens` with the model dtype vs int8: relative logit error, next-token top-1
    agreement and perplexity of the sequence."""
    fresh(device)
    model, _ = load_model(path, device=device, dtype=dtype)
    inputs = build_inputs(model, [tokens])
    n = len(tokens)
    context = inputs["context"].clone()
    context[:, -n:] = False  # predict the text: causal, like a language-model evaluation
    args = (inputs["input"], inputs["segment"], context, inputs["span"])
    reference = model(*args)[0, -n:-1].float()
    quantize_model(model)
    quantized = model(*args)[0, -n:-1].float()
    target = torch.tensor(tokens[1:], device=reference.device)
    ppl = lambda logits: math.exp(F.cross_entropy(logits, target).item())  # noqa: E731
    result = dict(
        relative_logit_error=((quantized - reference).norm() / reference.norm()).item(),
        max_abs_logit_error=(quantized - reference).abs().max().item(),
        top1_agreement=(quantized.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        ppl_reference=ppl(reference),
        ppl_int8=ppl(quantized),
    )
    del model
    return result


# ----- main ----------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cpmctl-bench-memory-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the random checkpoint (6 GB for 3b) and accelerate's offload


def run(args, tmp: Path):
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        path = Path(args.checkpoint)
        config = read_config(path)[0]
    else:
        if args.config:
            config = resolve_config(args.config)
        else:
            config = CPMAntConfig(vocab_size=args.vocab_size, dim_model=args.dim_model, dim_ff=args.dim_ff,
                                  num_layers=args.num_layers, num_heads=args.num_heads, dim_head=args.dim_head,
                                  half=False)
        start = time.perf_counter()
        path = write_random_checkpoint(config, tmp / "ckpt", dtype if dtype != torch.float32 else torch.float32,
                                       device if device.type == "cuda" else torch.device("cpu"), args.seed)
        print(f"random checkpoint written in {time.perf_counter() - start:.1f}s: {path}", file=sys.stderr)
    counts = param_counts(config)
    weight_bytes = counts["total"] * torch.empty((), dtype=dtype).element_size()
    if args.limit is None:
        if device.type == "cuda":
            sys.exit("--limit GB is required on a GPU")
        args.limit = round(0.5 * weight_bytes / GB, 4)
    budget = int(args.limit * GB)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = [BOS] + torch.randint(10, config.vocab_size, (args.prompt_tokens - 1,), generator=gen).tolist()
    print(f"model: {counts['total'] / 1e9:.3f}B parameters ({weight_bytes / GB:.2f} GB in {args.dtype}), "
          f"device {device}, limit {args.limit} GB, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    kernels = int8_kernel_times(config, device, dtype)
    print(f"one {config.dim_ff}x{config.dim_model} matmul, 1 row: {args.dtype} {kernels['dense']:.3f} ms, "
          f"int8pack {kernels['int8pack']:.3f} ms, int8 dequant+matmul {kernels['dequant']:.3f} ms", flush=True)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if "accelerate" in contenders:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            print("accelerate is not installed here: the naive synchronous streaming baseline replaces it")
            contenders = [("naive" if c == "accelerate" else c) for c in contenders]
    results = {}
    for name in contenders:
        try:
            if name == "resident":
                results[name] = run_resident(path, args, device, dtype, prompt)
            elif name == "resident-int8":
                results[name] = run_resident(path, args, device, dtype, prompt, int8=True)
            elif name == "cpmctl":
                results[name] = run_cpmctl(path, args, device, dtype, prompt, budget)
            elif name == "cpmctl-int8":
                results[name] = run_cpmctl(path, args, device, dtype, prompt, budget, int8=True)
            elif name == "accelerate":
                results[name] = run_accelerate(path, args, device, dtype, prompt, budget, tmp / "offload")
            elif name == "naive":
                results[name] = run_naive(path, args, device, dtype, prompt, budget)
            else:
                sys.exit(f"unknown contender {name}")
        except torch.OutOfMemoryError as e:
            results[name] = dict(error=f"out of memory: {str(e).splitlines()[0][:100]}")
        except Exception as e:  # noqa: BLE001 - report a failing peer and go on with the others
            results[name] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        r = results[name]
        if "error" in r:
            print(f"{name:14s} FAILED {r['error']}")
            continue
        decode_s = r["seconds"] - r["prefill_s"]
        r["tokens_per_s"] = (args.new_tokens - 1) / decode_s if decode_s > 0 else args.new_tokens / r["seconds"]
        print(f"{name:14s} {r['tokens_per_s']:8.2f} tok/s decoding  prefill {r['prefill_s']:6.2f}s  "
              f"peak {r['peak'] / GB:6.3f} GB  load {r['load_s']:6.1f}s  {r['note']}", flush=True)

    reference = results.get("resident", {}).get("ids")
    print("\nsummary")
    for name, r in results.items():
        if "error" in r:
            continue
        same = "n/a" if reference is None else ("identical" if r["ids"] == reference else "DIFFERENT")
        within = "within" if r["peak"] <= budget else "ABOVE"
        print(f"  {name:14s} greedy ids vs resident: {same:9s}  peak {r['peak'] / GB:.3f} GB ({within} the "
              f"{args.limit} GB limit)")
    for name in ("cpmctl", "cpmctl-int8"):
        for peer in ("accelerate", "naive", "resident", "cpmctl"):
            if name != peer and name in results and peer in results and "error" not in results[name] \
                    and "error" not in results[peer]:
                ratio = results[name]["tokens_per_s"] / results[peer]["tokens_per_s"]
                print(f"  {name} / {peer}: {ratio:.2f}x tokens/s")
    ours = results.get("cpmctl", {})
    if ours.get("streamed_gb_per_token"):
        block = int(ours["streamed_gb_per_token"] * GB / ours["streamed_blocks"])  # one streamed block's bytes
        limit = copy_bandwidth(block, device)
        rate = ours["streamed_gb_per_token"] * GB * ours["tokens_per_s"]
        ours.update(copy_gb_s=limit / GB, streamed_gb_s=rate / GB, fraction_of_copy=rate / limit)
        print(f"  limit: a block's {block / GB:.3f} GB copied at {limit / GB:.2f} GB/s "
              f"({'pinned host to device' if device.type == 'cuda' else 'memory to memory'}, measured here); cpmctl "
              f"streams {ours['streamed_gb_per_token']:.3f} GB per token at {rate / GB:.2f} GB/s = "
              f"{rate / limit:.2f} of it")
        resident = results.get("resident", {}).get("tokens_per_s")
        if resident:  # the copy overlaps compute on CUDA (side stream); on the CPU one thread does both in turn
            copy_s = ours["streamed_gb_per_token"] * GB / limit
            step_s = max(1 / resident, copy_s) if device.type == "cuda" else 1 / resident + copy_s
            ours.update(bound_tokens_per_s=1 / step_s, fraction_of_bound=ours["tokens_per_s"] * step_s)
            print(f"  bound: {1 / step_s:.2f} tok/s (the resident model's time per token "
                  f"{'or' if device.type == 'cuda' else 'plus'} the copy's); cpmctl {ours['tokens_per_s']:.2f} = "
                  f"{ours['tokens_per_s'] * step_s:.2f} of it")
    if "resident-int8" in results and "resident" in results and "error" not in results["resident-int8"]:
        ratio = results["resident-int8"]["tokens_per_s"] / results["resident"]["tokens_per_s"]
        print(f"  resident-int8 / resident ({args.dtype}): {ratio:.2f}x tokens/s")

    if args.json:
        for name, r in results.items():
            print(json.dumps({"contender": name, **{k: v for k, v in r.items() if k != "ids"}}))
    if args.no_quality:
        return
    tokens = prompt + torch.randint(10, config.vocab_size, (192,), generator=gen).tolist()
    if args.text:
        from cpmctl.model.tokenizer import CPMAntTokenizer

        from cpmctl.model.checkpoint import vocab_beside

        vocab = vocab_beside(path)
        if vocab is None:
            sys.exit(f"--text needs vocab.txt beside {path}")
        tokenizer = CPMAntTokenizer(vocab)
        tokens = ([BOS] + tokenizer.encode_for_model(Path(args.text).read_text(encoding="utf-8")))[:512]
    quality = int8_quality(path, device, dtype, tokens)
    print(f"\nint8 quality ({'text ' + args.text if args.text else 'random tokens, random weights'}, "
          f"{len(tokens)} tokens): relative logit error {quality['relative_logit_error']:.4f}, "
          f"top-1 agreement {quality['top1_agreement']:.3f}, ppl {quality['ppl_reference']:.2f} -> "
          f"{quality['ppl_int8']:.2f}")
    if args.json:
        print(json.dumps({"int8_quality": quality}))


if __name__ == "__main__":
    main()
