"""`cpmctl serve` (an OpenAI-compatible HTTP server) and `cpmctl chat` (a conversation in the terminal).

Both load the model as `generate` does and decode on the serving engine (cpmctl/serve/). torch, Starlette and
uvicorn are imported when a command runs, not when the CLI starts."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import typer

from cpmctl import CpmctlError
from cpmctl.cli.common import emit_json, err, examples, out

SERVE_EXAMPLES = examples(
    "cpmctl serve --model runs/mini/model --port 8000",
    "cpmctl serve --model runs/mini/model --adapter runs/mini/lcsts-lora/best --api-key $KEY",
    "cpmctl serve --model cpm-ant-10b/ --memory-limit 4 --quantize int8",
    "curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"北京的冬天\", \"max_tokens\": 32}'")
CHAT_EXAMPLES = examples(
    "cpmctl chat --model runs/mini/model", "printf '你好\\n介绍一下北京\\n' | cpmctl chat --model runs/mini/model")

API_KEY_ENV = "CPMCTL_API_KEY"
CHAT_ROWS = 4  # chat decodes one sequence at a time; 4 rows leave room for beam search up to 4 beams

_Model = typer.Option(..., "--model", help="Checkpoint: native dir, original .pt (config .json beside) or HF dir.")
_Adapter = typer.Option(None, "--adapter", help="LoRA adapter directory (from `cpmctl tune lora`), unmerged.")
_Vocab = typer.Option(None, "--vocab", help="Vocab file (default: vocab.txt beside the checkpoint).")
_Device = typer.Option("auto", "--device", help="cpu, cuda or auto.")
_Dtype = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16 (GPU).")
_MemoryLimit = typer.Option(None, "--memory-limit", help="GB of device memory for weights, KV cache and activations; "
                            "blocks that do not fit stream (docs/memory.md).")
_Quantize = typer.Option(None, "--quantize", help="int8: weight-only int8 linears; int8-dynamic (-head): int8 activations too, CPU, all resident; int4: weight-only int4 linears, groups of 128 (docs/memory.md).")


def _load(model_path, adapter, vocab, device, dtype, memory_limit, quantize, limits, name=None):
    from cpmctl.device import resolve_device, resolve_dtype
    from cpmctl.serve.load import load_for_serving

    dev = resolve_device(device)
    return load_for_serving(model_path, limits, device=dev, dtype=resolve_dtype(dtype, dev), adapter=adapter,
                            vocab=vocab, memory_limit_gb=memory_limit, quantize=quantize, name=name)


def _plan_line(plan) -> str:
    from cpmctl.generate.offload import describe_plan
    from cpmctl.generate.plan import human_bytes

    if plan is None:
        return "memory plan: not available for this device"
    if plan.budget is not None or plan.quantize:
        head = describe_plan(plan)
    else:
        head = f"memory plan ({plan.device_type}, {plan.dtype}): all {len(plan.resident)} blocks resident"
    return (f"{head}; weights {human_bytes(plan.weight_bytes)}, KV cache {human_bytes(plan.cache_bytes)} for "
            f"{plan.batch_rows} rows x {plan.capacity} positions")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(
    model_path: Path = _Model,
    adapter: Path = _Adapter,
    vocab: Path = _Vocab,
    memory_limit: float = _MemoryLimit,
    quantize: str = _Quantize,
    device: str = _Device,
    dtype: str = _Dtype,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port; the banner names it)."),
    api_key: str = typer.Option(None, "--api-key", envvar=API_KEY_ENV, show_default=False,
                                help=f"Require `Authorization: Bearer KEY` on /v1/* and /metrics (or ${API_KEY_ENV})."),
    served_name: str = typer.Option(None, "--served-model-name", help="The model id clients send (default: the "
                                    "checkpoint's directory name)."),
    max_batch: int = typer.Option(8, "--max-batch", help="Sequences decoded together (continuous batching)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond the batch; more get 503."),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", help="Longest prompt (<s> included); longer: 400."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Largest max_tokens a request may ask; larger: 400."),
    json_out: bool = typer.Option(False, "--json", help="The banner as one JSON object on stdout; one JSON line per "
                                  "request on stderr."),
):
    """Serve a model over OpenAI-compatible HTTP (completions, chat, streaming), with continuous batching."""
    from cpmctl.serve.server import require_serving_stack

    require_serving_stack()
    from cpmctl.serve.app import ServeSettings, create_app
    from cpmctl.serve.engine import Engine, Limits
    from cpmctl.serve.server import bind, run, url_of

    if not 0 <= port <= 65535:
        raise CpmctlError(f"--port must be in 0..65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise CpmctlError(f"--api-key (or ${API_KEY_ENV}) is empty")
    limits = Limits(max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                    max_new_tokens=max_tokens)
    limits.check()
    sock = bind(host, port)  # before loading: a busy port fails at once
    served = _load(model_path, adapter, vocab, device, dtype, memory_limit, quantize, limits, served_name)
    engine = Engine(served.loaded.model, served.loaded.tokenizer, limits)
    served.loaded.tokenizer.encode("预热")  # jieba loads its dictionary now, not on the first request
    answered = {"n": 0}

    def log(record: dict) -> None:
        answered["n"] += 1
        if json_out:
            sys.stderr.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            tokens = f" {record.get('prompt_tokens', 0)}+{record.get('completion_tokens', 0)} tokens" \
                if "prompt_tokens" in record else ""
            sys.stderr.write(f"{record['endpoint']} {record['status']}{tokens} {record['latency_s']:.3f} s"
                             f"{' ' + record['error'] if 'error' in record else ''}\n")
        sys.stderr.flush()

    app = create_app(engine, ServeSettings(served.name, api_key, log))
    url = url_of(sock)
    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if api_key else ""
    body = json.dumps({"model": served.name, "prompt": "今天天气不错，", "max_tokens": 32}, ensure_ascii=False)
    example = f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"
    if json_out:
        emit_json({"url": f"{url}/v1", "model": served.name, "checkpoint": str(model_path),
                   "api_key_required": api_key is not None, "limits": limits.__dict__,
                   "plan": served.plan.to_dict() if served.plan is not None else None, "example": example})
    else:
        out.print(f"serving {served.name} ({model_path}) at {url}/v1 (OpenAI-compatible)", markup=False)
        out.print(_plan_line(served.plan), markup=False)
        out.print(f"batch {max_batch}, queue {max_queue}, prompts <= {max_prompt_tokens} tokens, max_tokens <= "
                  f"{max_tokens}; API key {'required' if api_key else 'not required'}", markup=False)
        out.print(f"try: {example}", markup=False)
    if not _is_loopback(host) and api_key is None:
        err.print(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model")
    try:
        caught = run(app, sock)
    finally:
        served.loaded.close()
    if json_out:
        emit_json({"stopped": caught or "shutdown", "requests": answered["n"]})
    else:
        out.print(f"stopped ({caught or 'shutdown'}) after answering {answered['n']} requests", markup=False)


def chat(
    model_path: Path = _Model,
    adapter: Path = _Adapter,
    vocab: Path = _Vocab,
    memory_limit: float = _MemoryLimit,
    quantize: str = _Quantize,
    device: str = _Device,
    dtype: str = _Dtype,
    system: str = typer.Option(None, "--system", help="A system message, the first line of the conversation."),
    decode: str = typer.Option(None, "--decode", help="greedy, sample or beam (default: sample)."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(None, "--top-p", help="Sampling: nucleus mass."),
    top_k: int = typer.Option(None, "--top-k", help="Sampling: keep the k best tokens."),
    repetition_penalty: float = typer.Option(None, "--repetition-penalty", help="CTRL penalty, >= 1."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (each reply starts from it)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Longest reply, in tokens."),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens",
                                          help="The context window: older turns are dropped to stay within it."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per reply on stdout."),
):
    """Chat with a model in the terminal (or one message per line from a pipe). /reset, /settings k=v, /exit."""
    from cpmctl.serve.chat import ChatSession, EndChat
    from cpmctl.serve.engine import Engine, Limits

    limits = Limits(max_batch=CHAT_ROWS, max_queue=1, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_tokens)
    limits.check()
    settings = {"decode": decode, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "repetition_penalty": repetition_penalty, "seed": seed, "system": system}
    served = _load(model_path, adapter, vocab, device, dtype, memory_limit, quantize, limits)
    engine = Engine(served.loaded.model, served.loaded.tokenizer, limits).start()
    interactive = sys.stdin.isatty()
    try:
        session = ChatSession(engine, settings)
        if interactive:
            err.print(f"chatting with {served.name}; /reset, /settings key=value, /exit (CPM-Ant is not chat-tuned: "
                      "docs/serve.md)", markup=False)
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    # Scripts read replies on stdout: what a command says goes to stderr there too.
                    err.print(session.command(line), markup=False)
                    continue
                stream = interactive and not json_out
                turn = session.reply(line, (lambda t: out.print(t, end="", markup=False)) if stream else None)
            except EndChat:
                break
            except CpmctlError as e:
                if not interactive:
                    raise
                err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
                continue
            except KeyboardInterrupt:
                if not interactive:
                    raise
                out.print()
                err.print("(reply interrupted)", markup=False)
                continue
            if turn.dropped:
                err.print(f"(dropped the {turn.dropped} oldest messages to fit --max-prompt-tokens)", markup=False)
            if json_out:
                emit_json({"user": line, "reply": turn.reply, "finish_reason": turn.finish_reason,
                           "prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
                           "dropped_messages": turn.dropped})
            elif stream:
                out.print()
            else:
                out.print(turn.reply, markup=False)
    finally:
        engine.close()
        served.loaded.close()
