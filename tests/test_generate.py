"""Decoding against oracles: transformers' forward in a greedy loop, and plain re-implementations of the original
CPM-Live beam search and sampling (cpm_live/generation/ant.py) that recompute the whole sequence at every step
without a cache (generated tokens context False), with the two changes of shared/reference/cpm-ant.md section 6:
prompt task 2, and the first step bans </s> as well as the newline."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cpmctl import CpmctlError
from cpmctl.generate.decode import apply_repetition_penalty, beam_search, generate, greedy, sample, top_k_top_p_filter
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.model.inputs import build_inputs, prompt_slots
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import convert, save_native
from cpmctl.model.tokenizer import EOS, NEWLINE, PAD, CPMAntTokenizer
from tests.conftest import tiny_config

VOCAB = 341


def _texts(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[6] + torch.randint(10, VOCAB, (n - 1,), generator=gen).tolist() for n in lengths]


def _model(seed, eos_scale=1.0):
    """A tiny random model with peaked next-token distributions; `eos_scale` stretches the </s> embedding so that
    </s> shows up among the candidates (large) or never does (0). The embeddings are scaled from the original's
    std 0.02 init to std 1, so that the tied head gives a random model the sharp logits these decoding tests need."""
    model = build_model(tiny_config(VOCAB), seed=seed).eval()
    with torch.no_grad():
        model.input_embedding.weight.mul_(1 / 0.02)
        model.input_embedding.weight[EOS] *= eos_scale
    return model


# ----- the original's loops, recomputing everything ----------------------------------------------------------------
@torch.no_grad()
def full_logits(model, text: list[int], generated: list[list[int]]) -> torch.Tensor:
    """Last-position logits for each row `text + generated[r]`: prompt task 2, segment 0 / 2, context True for the
    prompt and text, False for generated tokens (what the original's cached steps compute)."""
    config = model.config
    rows = [prompt_slots(config.vocab_size, 2) + text + g for g in generated]
    n_given = config.prompt_length + len(text)
    ids = torch.tensor(rows)
    segment = torch.tensor([[0] * config.prompt_length + [2] * (len(r) - config.prompt_length) for r in rows])
    context = torch.tensor([[True] * n_given + [False] * (len(r) - n_given) for r in rows])
    return model(ids, segment, context, torch.zeros_like(ids))[:, -1].float()


def original_penalty(logits, generated: list[list[int]], penalty: float):
    for row, tokens in enumerate(generated):
        for token in set(tokens):
            if logits[row, token] < 0:
                logits[row, token] *= penalty
            else:
                logits[row, token] /= penalty


def original_filter(logits, top_k=0, top_p=0.0):
    logits = logits.clone()
    if top_k > 0:
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = float("-inf")
    if top_p > 0.0:
        for row in range(len(logits)):
            sorted_logits, order = torch.sort(logits[row], descending=True)
            remove = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
            remove[1:] = remove[:-1].clone()
            remove[0] = False
            logits[row][order[remove]] = float("-inf")
    return logits


class NBest:
    """The original's BeamHypotheses with length_penalty 1 and early_stopping False."""

    def __init__(self, n):
        self.n, self.hyps, self.worst = n, [], 1e9

    def add(self, tokens, sum_logprobs):
        score = sum_logprobs / len(tokens)
        if len(self.hyps) < self.n or score > self.worst:
            self.hyps.append((score, tokens))
            if len(self.hyps) > self.n:
                scores = [s for s, _ in self.hyps]
                del self.hyps[scores.index(min(scores))]
            self.worst = min(s for s, _ in self.hyps)

    def is_done(self, best_sum, cur_len):
        return len(self.hyps) >= self.n and self.worst >= best_sum / cur_len


def original_beam_search(model, text, beam_size, max_new_tokens, penalty):
    generate_length = max_new_tokens + 1
    rows = [[] for _ in range(beam_size)]
    beam_scores = torch.tensor([0.0] + [-1e9] * (beam_size - 1))
    hyps = NBest(beam_size)
    for i in range(generate_length + 1):
        logits = full_logits(model, text, rows)
        if i == 0:
            logits[:, EOS] = float("-inf")
            logits[:, NEWLINE] = float("-inf")
        original_penalty(logits, rows, penalty)
        scores = F.log_softmax(logits, dim=-1)
        vocab = scores.shape[-1]
        next_scores, next_words = torch.topk((scores + beam_scores[:, None]).view(-1), 2 * beam_size)
        if hyps.is_done(next_scores.max().item(), i):
            break
        next_beam = []
        for idx, value in zip(next_words.tolist(), next_scores.tolist()):
            beam_id, word = idx // vocab, idx % vocab
            if word == EOS or i == generate_length:
                hyps.add(list(rows[beam_id]), value)
            else:
                next_beam.append((value, word, beam_id))
            if len(next_beam) == beam_size:
                break
        if i == generate_length:
            break
        beam_scores = torch.tensor([v for v, _, _ in next_beam])
        rows = [rows[b] + [w] for _, w, b in next_beam]
    return max(hyps.hyps, key=lambda x: x[0])[1]


def original_sampling(model, texts, max_new_tokens, top_k, top_p, temperature, penalty, seed):
    """Same-length prompts (the batch is sampled together, so the random stream is consumed as in ours)."""
    generate_length = max_new_tokens + 1
    gen = torch.Generator().manual_seed(seed)
    rows = [[] for _ in texts]
    results = [None] * len(texts)
    for i in range(generate_length):
        logits = torch.cat([full_logits(model, t, [g]) for t, g in zip(texts, rows)])
        if i == 0:
            logits[:, EOS] = float("-inf")
            logits[:, NEWLINE] = float("-inf")
        original_penalty(logits, rows, penalty)
        logits = original_filter(logits / temperature, top_k, top_p)
        tokens = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)[:, 0].tolist()
        for r, token in enumerate(tokens):
            if results[r] is None and (token == EOS or i == generate_length - 1):
                results[r] = list(rows[r])
        if all(r is not None for r in results):
            break
        rows = [g + [t] for g, t in zip(rows, tokens)]
    return results


# ----- beam search -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "beam_size,penalty,eos_scale,seed",
    [(3, 1.0, 1.0, 0), (3, 1.5, 1.0, 1), (2, 1.2, 6.0, 2), (4, 1.3, 8.0, 3), (1, 1.5, 6.0, 4), (3, 2.0, 10.0, 5)],
)
def test_beam_search_equals_the_original_loop(beam_size, penalty, eos_scale, seed):
    model = _model(seed, eos_scale)
    texts = _texts([5, 9, 2], seed)
    cfg = GenerationConfig(decode="beam", beam_size=beam_size, repetition_penalty=penalty, max_new_tokens=8)
    ours = beam_search(model, build_inputs(model, texts), cfg)
    expected = [original_beam_search(model, t, beam_size, 8, penalty) for t in texts]
    assert ours == expected


def test_beam_search_exercises_early_ends():
    """The EOS-prone setting of the oracle test does finish hypotheses before the length limit."""
    model = _model(3, 8.0)
    cfg = GenerationConfig(decode="beam", beam_size=4, repetition_penalty=1.3, max_new_tokens=8)
    lengths = [len(ids) for ids in beam_search(model, build_inputs(model, _texts([5, 9, 2], 3)), cfg)]
    assert min(lengths) < 9


def test_beam_output_can_hold_max_new_tokens_plus_one():
    """The original's quirk: generate_length = max_new_tokens + 1, so a beam cut by the limit is one longer."""
    model = _model(6, eos_scale=0.0)  # </s> logit 0: never among the top candidates of a random model
    cfg = GenerationConfig(decode="beam", beam_size=3, repetition_penalty=1.5, max_new_tokens=6)
    for ids in beam_search(model, build_inputs(model, _texts([4, 7], 6)), cfg):
        assert len(ids) == 7


# ----- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p,temperature,penalty", [(0, 0.9, 0.9, 1.0), (5, 0.0, 1.0, 1.3), (8, 0.7, 0.5, 1.2)])
def test_sampling_equals_the_original_loop(top_k, top_p, temperature, penalty):
    model = _model(7, eos_scale=4.0)
    texts = _texts([6, 6, 6], 8)
    cfg = GenerationConfig(decode="sample", top_k=top_k, top_p=top_p, temperature=temperature,
                           repetition_penalty=penalty, max_new_tokens=10, seed=123)
    ours = sample(model, build_inputs(model, texts), cfg)
    assert ours == original_sampling(model, texts, 10, top_k, top_p, temperature, penalty, seed=123)
    assert all(len(ids) <= 10 for ids in ours)


def test_sampling_stops_at_max_new_tokens_and_is_seeded():
    model = _model(9, eos_scale=0.0)
    inputs = build_inputs(model, _texts([5, 3], 9))
    cfg = GenerationConfig(decode="sample", top_k=5, max_new_tokens=7, seed=1)
    first = sample(model, inputs, cfg)
    assert [len(ids) for ids in first] == [7, 7]
    assert sample(model, inputs, cfg) == first


def test_filter_equals_the_original():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(10)) * 3
    for top_k, top_p in [(0, 0.9), (10, 0.0), (10, 0.5), (0, 0.0), (1, 0.99), (0, 1.0)]:
        ours = top_k_top_p_filter(logits.clone(), top_k, top_p)
        assert torch.equal(ours, original_filter(logits, top_k, top_p)), (top_k, top_p)


def test_repetition_penalty_is_ctrl_on_generated_tokens_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_repetition_penalty(logits.clone(), torch.tensor([[0, 1, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.empty(1, 0, dtype=torch.long), 2.0), logits)


def test_repetition_window_penalises_only_the_last_tokens():
    """The original's window (generation_utils.apply_repetition_penalty): output_tokens[max(start, end + 1 - W):
    end + 1], the last W generated tokens. Token 0 was generated 3 steps ago and leaves a window of 2."""
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    generated = torch.tensor([[0, 3, 1, 1]])
    out = apply_repetition_penalty(logits.clone(), generated, 2.0, window=2)
    assert out.tolist() == [[2.0, -4.0, 1.0, -1.0]]
    assert apply_repetition_penalty(logits.clone(), generated, 2.0, window=4).tolist() == [[1.0, -4.0, 1.0, -2.0]]
    # Greedy decoding with a window equals the recompute-everything loop with the original's windowed penalty.
    model = _model(5)
    texts = _texts([6, 3], 5)
    cfg = GenerationConfig(decode="greedy", repetition_penalty=3.0, repetition_window=2, max_new_tokens=10)
    ours = greedy(model, build_inputs(model, texts), cfg)
    for text, ids in zip(texts, ours):
        want: list[int] = []
        for _ in range(10):
            logits = full_logits(model, text, [want])
            original_penalty(logits, [want[-2:]], 3.0)
            token = int(logits.argmax(-1))
            if token == EOS:
                break
            want.append(token)
        assert ids == want
    unwindowed = greedy(model, build_inputs(model, texts), GenerationConfig(decode="greedy", repetition_penalty=3.0,
                                                                           max_new_tokens=10))
    assert unwindowed != ours  # the window changes what is penalised here: tokens come back after 2 steps
    with pytest.raises(CpmctlError, match="--repetition-window must be >= 1"):
        GenerationConfig(repetition_window=0).validate()


# ----- greedy ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    from transformers import CpmAntForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = tmp_path_factory.mktemp("hf")
    model = _model(11)
    save_native(model, tmp / "native")
    convert(tmp / "native", "hf", tmp / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = CpmAntForCausalLM.from_pretrained(tmp / "hf").eval()
    # The export's generation_config.json carries cpmctl's default decoding (beam 3, the first-step ban); these
    # tests ask HF for plain greedy, so its generate() starts from transformers' own defaults.
    hf.generation_config = HFGenerationConfig()
    return model, hf


@torch.no_grad()
def hf_greedy(hf, text, max_new_tokens, penalty):
    """Greedy decoding on transformers' forward with its own KV cache, the original's penalty in the loop."""
    ids, past, out = torch.tensor([text]), None, []
    for _ in range(max_new_tokens):
        result = hf(input_ids=ids, past_key_values=past, use_cache=True)
        past = result.past_key_values
        logits = result.logits[:, -1].float()
        original_penalty(logits, [out], penalty)
        token = int(logits.argmax(-1))
        if token == EOS:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return out


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_equals_transformers(hf_pair, penalty):
    model, hf = hf_pair
    texts = _texts([4, 12, 7], 12)
    ours = greedy(model, build_inputs(model, texts), GenerationConfig(decode="greedy", repetition_penalty=penalty, max_new_tokens=12))
    assert ours == [hf_greedy(hf, t, 12, penalty) for t in texts]
    if penalty == 1.0:  # and transformers' own generate()
        for text, ids in zip(texts, ours):
            with torch.no_grad():
                out = hf.generate(torch.tensor([text]), max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
            assert out[0, len(text):].tolist()[: len(ids)] == ids


def test_decode_step_shortcuts_compute_the_plain_formulas():
    """What a decode step does differently from the general forward: the fp32 RMS norm in one call, a (b, 1, H * D)
    projection read as (b, H, 1, D) without transposes, the head of a few CPU rows as E @ h^T. Each against the
    plain formula it replaces (from ant.py's history and the CPM-Ant maths, shared/reference/cpm-ant.md)."""
    torch.manual_seed(0)
    model = _model(15)
    norm = model.encoder.layers[0].self_att.layernorm_before_attention
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        for shape in [(3, 5, 64), (2, 1, 64)]:
            h = torch.randn(shape) * 3
            plain = (h * torch.rsqrt(h.float().pow(2).mean(dim=-1, keepdim=True) + norm.eps)).to(h.dtype) * norm.weight
            assert torch.equal(norm(h), plain)  # bit for bit: the same maths

        attention = model.encoder.layers[0].self_att.self_attention
        b, heads, dim = 3, attention.num_heads, attention.dim_head
        x, keys = torch.randn(b, 1, 64), torch.randn(b, 6, 64)
        bias = torch.randn(b, heads, 1, 7)
        bias[0, :, :, 2] = float("-inf")
        split = lambda t: t.view(b, -1, heads, dim).transpose(1, 2)  # noqa: E731
        q = split(attention.project_q(x))
        k = torch.cat([split(attention.project_k(keys)), split(attention.project_k(x))], 2)
        v = torch.cat([split(attention.project_v(keys)), split(attention.project_v(x))], 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / dim**0.5 + bias, dim=-1)
        want = attention.attention_out((probs @ v).transpose(1, 2).reshape(b, 1, heads * dim))
        # The keys through a KV cache as a decode step sees them: 6 cached positions, then this step's.
        from cpmctl.model.ant import KVCache

        cache = KVCache.allocate(model, b, 8)
        cache.k[0][:, :, :6], cache.v[0][:, :, :6] = k[:, :, :6], v[:, :, :6]
        cache.length = 6
        assert torch.allclose(attention(x, bias, cache, 0), want, atol=1e-5)

        for rows in (1, 2, 5, 16, 17):  # 2..16: E @ h^T on the CPU; 1 and 17: the plain product
            h = torch.randn(rows, 1, 64)
            logits = model.logits(h)
            assert logits.shape == (rows, 1, model.config.vocab_size) and logits.is_contiguous()
            plain = F.linear(h, model.input_embedding.weight)
            assert torch.allclose(logits, plain, atol=1e-5, rtol=1e-5)
            assert torch.equal(logits.argmax(-1), plain.argmax(-1))
            if rows == 1:
                assert torch.equal(logits, plain)


def _steps_of_both(model, texts, steps=5, seed=0):
    """Logits of `steps` decode steps on random tokens, through model.forward and through DecodeStep, each on its own
    cache after the same prompt pass."""
    from cpmctl.generate.decode import _prefill, _step_inputs
    from cpmctl.generate.step import DecodeStep

    inputs = build_inputs(model, texts)
    (_, plain_cache), (_, fast_cache) = _prefill(model, inputs, steps + 1), _prefill(model, inputs, steps + 1)
    segment, context, span = _step_inputs(len(texts), "cpu")
    fast = DecodeStep(model)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.randint(0, model.config.vocab_size, (len(texts),), generator=gen)
            out.append((model(tokens[:, None], segment, context, span, cache=plain_cache)[:, -1],
                        fast(fast_cache, tokens, segment, context, span)))
    assert plain_cache.length == fast_cache.length
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[9], [4, 12, 7]])
def test_decode_step_equals_the_forward_bit_for_bit(dtype, lengths):
    """generate/step.py runs the forward's kernels on the same operands in the same order: equal logits, for one row
    and for left-padded rows, with a dropped attention and a dropped FFN sub-block."""
    from cpmctl.generate.step import covers

    model = build_model(tiny_config(VOCAB, num_layers=3, mask_modules=[[False, False], [True, False], [False, True]]),
                        seed=5).eval().to(dtype)
    assert covers(model)
    for plain, fast in _steps_of_both(model, _texts(lengths, 8)):
        assert fast.dtype == plain.dtype and torch.equal(fast, plain)


def test_decode_step_leaves_what_it_does_not_cover_to_the_forward():
    """Hooks (a streamed model binds its weights in them), pruning gates and training mode take the forward, and
    decoding gives the same ids either way."""
    from cpmctl.generate.step import covers

    model = _model(16)
    texts = _texts([5, 9], 3)
    cfg = GenerationConfig(decode="greedy", max_new_tokens=8)
    fast_ids = greedy(model, build_inputs(model, texts), cfg)
    calls = []
    hook = model.encoder.layers[1].register_forward_pre_hook(lambda m, args: calls.append(1))
    assert not covers(model)
    assert greedy(model, build_inputs(model, texts), cfg) == fast_ids
    assert len(calls) == 8  # the prompt pass and 7 steps went through the hooked block
    hook.remove()
    assert covers(model)
    model.encoder.layers[0].attention_gate = torch.tensor(1.0)
    assert not covers(model)
    model.encoder.layers[0].attention_gate = None
    model.train()
    assert not covers(model)


def test_first_step_bans_eos_and_newline():
    """</s> and the newline made the two most likely first tokens: greedy (no ban) stops at once; beam search and
    sampling (the original's ban) never start with either."""
    model = _model(13)
    texts = _texts([5], 13)
    inputs = build_inputs(model, texts)
    with torch.no_grad():
        h = model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"], return_hidden=True)[0, -1]
        model.input_embedding.weight[EOS] = h * 50
        model.input_embedding.weight[NEWLINE] = h * 40
    assert greedy(model, inputs, GenerationConfig(decode="greedy")) == [[]]
    first = greedy(model, inputs, GenerationConfig(decode="greedy", max_new_tokens=3, ban_first_step=True))[0][0]
    assert first not in (EOS, NEWLINE)
    beam = beam_search(model, inputs, GenerationConfig(decode="beam", max_new_tokens=3))[0]
    assert beam and beam[0] not in (EOS, NEWLINE)
    for seed in range(5):
        ids = sample(model, inputs, GenerationConfig(decode="sample", top_p=1.0, temperature=5.0, max_new_tokens=2, seed=seed))[0]
        assert ids and ids[0] not in (EOS, NEWLINE)


# ----- generate() --------------------------------------------------------------------------------------------------
def test_generate_text_and_batch_invariance(tiny_vocab):
    tokenizer = CPMAntTokenizer(tiny_vocab)
    model = _model(14)
    prompts = ["今天天气不错，", "我们的学校", "hello world 20"]
    cfg = GenerationConfig(decode="beam", repetition_penalty=1.3, max_new_tokens=6)
    together = generate(model, tokenizer, prompts, cfg)
    alone = [generate(model, tokenizer, [p], cfg)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for result, prompt in zip(together, prompts):
        assert result.prompt == prompt and result.text == tokenizer.decode(result.token_ids)


def test_generate_rejects_bad_input(tiny_vocab):
    tokenizer = CPMAntTokenizer(tiny_vocab)
    model = _model(15)
    with pytest.raises(CpmctlError, match="prompt 2 is empty"):
        generate(model, tokenizer, ["今天", "  "], GenerationConfig())
    for bad, message in [
        (dict(decode="nucleus"), "--decode"),
        (dict(beam_size=0), "--beam-size"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(repetition_penalty=0.5), "--repetition-penalty"),
        (dict(top_p=1.5), "--top-p"),
        (dict(temperature=0.0), "--temperature"),
        (dict(top_k=-1), "--top-k"),
    ]:
        with pytest.raises(CpmctlError, match=message):
            generate(model, tokenizer, ["今天"], GenerationConfig(**bad))


# ----- the batching core (cpmctl/generate/batch.py) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_checkpoint(tmp_path_factory, tiny_vocab):
    cfg = tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size)
    return save_native(build_model(cfg, seed=16), tmp_path_factory.mktemp("batch") / "ckpt", vocab=tiny_vocab)


def test_read_prompts_and_collect_prompts(tmp_path):
    from cpmctl.generate.batch import collect_prompts, read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "今天", "id": 1}\n\n{"prompt": "我们"}\n', encoding="utf-8")
    assert read_prompts(path) == ["今天", "我们"] == collect_prompts(None, path)
    assert collect_prompts("北京", None) == ["北京"]
    for prompt, input_file, message in [(None, None, "give a PROMPT"), ("x", path, "one of them"),
                                        (None, tmp_path / "none.jsonl", "input file not found"), (" ", None, "prompt 1 is empty")]:
        with pytest.raises(CpmctlError, match=message):
            collect_prompts(prompt, input_file)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(CpmctlError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")


def test_prepare_generation_batches_in_order_and_streams_only_one_prompt(batch_checkpoint, tmp_path, tiny_vocab):
    from cpmctl.generate.batch import prepare_generation

    tokenizer = CPMAntTokenizer(tiny_vocab)
    prompts = ["今天天气", "我们的学校", "hello world"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in prompts), encoding="utf-8")
    cfg = GenerationConfig(decode="greedy", max_new_tokens=5)
    run = prepare_generation(batch_checkpoint, cfg, input_file=path, batch_size=2, device="cpu",
                             on_text=lambda text: None)
    assert not run.streaming and run.plan is None  # three prompts: no streaming
    batched = list(run.results())
    assert [r.prompt for r in batched] == prompts
    with pytest.raises(RuntimeError, match="decodes once"):
        list(run.results())
    pieces = []
    alone = prepare_generation(batch_checkpoint, cfg, prompt=prompts[0], device="cpu", on_text=pieces.append)
    assert alone.streaming
    [one] = alone.results()
    assert one.token_ids == batched[0].token_ids and "".join(pieces) == tokenizer.decode(one.token_ids)
    beam = prepare_generation(batch_checkpoint, GenerationConfig(max_new_tokens=3), prompt=prompts[0], device="cpu",
                              on_text=pieces.append)
    assert not beam.streaming  # beam search has no token order to stream
    with pytest.raises(CpmctlError, match="--batch-size must be >= 1, got 0"):
        prepare_generation(batch_checkpoint, cfg, prompt="今天", batch_size=0, device="cpu")


def test_limited_load_plans_for_the_prompts(batch_checkpoint, tiny_vocab):
    """--memory-limit: the plan is sized from the tokenized prompts, batch and decoding, and the model follows it."""
    from cpmctl.generate.batch import prepare_generation
    from cpmctl.generate.plan import generation_shape

    tokenizer = CPMAntTokenizer(tiny_vocab)
    cfg = GenerationConfig(decode="beam", beam_size=2, max_new_tokens=4)
    run = prepare_generation(batch_checkpoint, cfg, prompt="今天天气", device="cpu", memory_limit_gb=1.0)
    config = run.loaded.model.config
    tokens = len(tokenizer.encode_for_model("今天天气")) + 1
    assert (run.plan.batch_rows, run.plan.prefill_length, run.plan.capacity) == generation_shape(
        config, [tokens], 8, "beam", 2, 4)
    limited = [r.token_ids for r in run.results()]
    plain = [r.token_ids for r in prepare_generation(batch_checkpoint, cfg, prompt="今天天气", device="cpu").results()]
    assert limited == plain


def test_generate_help_names_the_dataclass_defaults(capsys, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    code, out, _ = run_cli(capsys, "generate", "--help")
    assert code == 0
    text = " ".join(out.split())
    defaults = GenerationConfig()
    for flag in ("--decode", "--beam-size", "--top-k", "--top-p", "--temperature", "--repetition-penalty",
                 "--max-new-tokens", "--seed", "--input", "--batch-size", "--device", "--dtype", "--memory-limit",
                 "--quantize", "--json", "--model", "--adapter", "--vocab"):
        assert flag in text, flag
    for value in (defaults.decode, defaults.beam_size, defaults.top_p, defaults.max_new_tokens):
        assert f"(default {value})" in text
