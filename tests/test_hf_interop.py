"""cpmctl and the Hugging Face ecosystem, both ways, against the real transformers and peft: an adapter tuned by
`cpmctl tune lora` applied by plain `PeftModel.from_pretrained` on the HF export; a LoRA trained with peft on
`CpmAntForCausalLM` used by `cpmctl generate --adapter`; a pruned model exported to HF (dropped sub-blocks as zero
weights) computing exactly the pruned model, with the tokenizer and generation files `AutoTokenizer` and `generate`
read; and an HF checkpoint with an untied head refused rather than silently re-tied."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from cpmctl import CpmctlError
from cpmctl.model import lora as L
from cpmctl.model.ant import build_model
from cpmctl.model.checkpoint import convert, load_model, save_native
from cpmctl.model.inputs import build_inputs
from cpmctl.model.tokenizer import CPMAntTokenizer
from tests.conftest import run_cli, tiny_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
MASK = [[False, False], [True, False], [False, True], [True, True]]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_hf():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _hf(path):
    from transformers import CpmAntForCausalLM

    return CpmAntForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def _texts(vocab_size: int, lengths=(12, 12), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # <s> then ordinary tokens (ids >= 10: no special token, no pad 0, which HF reads as padding)
    return [[6] + torch.randint(10, vocab_size, (n - 1,), generator=g).tolist() for n in lengths]


def _ours(model, texts) -> torch.Tensor:
    """cpmctl's logits over the text positions of equal-length rows (what HF computes for input_ids)."""
    inputs = build_inputs(model, texts)
    with torch.no_grad():
        logits = model(inputs["input"], inputs["segment"], inputs["context"], inputs["span"])
    return logits[:, model.config.prompt_length :]


def _theirs(hf_model, texts) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(texts)).logits


@pytest.fixture
def base(tmp_path, tiny_vocab):
    """A tiny native checkpoint with its vocabulary, and its HF export."""
    model = build_model(tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size), seed=0)
    native = save_native(model, tmp_path / "base", vocab=tiny_vocab)
    convert(native, "hf", tmp_path / "base-hf")
    return native, tmp_path / "base-hf"


# ----- (1) cpmctl tunes, peft applies ------------------------------------------------------------------------
def test_cpmctl_adapter_loads_with_plain_peft_on_the_hf_export(tmp_path, base, capsys):
    native, hf_dir = base
    code, stdout, err = run_cli(
        capsys, "tune", "lora", "--task", "lcsts", "--model", native, "--data", FIXTURES / "lcsts",
        "--out", tmp_path / "run", "--json", "train.device=cpu", "train.valid_batches=0", "train.batch_size=4",
        "train.lr=0.05", "train.warmup_steps=1", "train.schedule=constant", "train.grad_clip=0",
        "train.save_every=100", "tune.epochs=3", "tune.patience=0", "decode.decode=greedy",
        "decode.max_new_tokens=4", "lora.targets=[project_q,project_v,w_out]")
    assert code == 0, err
    adapter = Path(json.loads(stdout)["adapter"])

    # The adapter records its base by absolute path and content hash, and names the HF modules peft will find.
    meta = json.loads((adapter / L.ADAPTER_META).read_text())
    assert meta["base_model"]["path"] == str(native.resolve())
    assert len(meta["base_model"]["files"][0]["sha256"]) == 64
    assert Path(json.loads((adapter / L.ADAPTER_CONFIG).read_text())["base_model_name_or_path"]).is_absolute()

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_hf(hf_dir), str(adapter)).eval()
    ours, _ = L.load_model_with_adapter(native, adapter)
    texts = _texts(ours.config.vocab_size)
    want, got = _ours(ours, texts), _theirs(peft_model, texts)
    plain = _theirs(_hf(hf_dir), texts)
    assert (got - want).abs().max().item() < TOL
    assert (got - plain).abs().max().item() > 1e-3  # the adapter is applied: not the bare base model


@pytest.mark.parametrize("settings", [L.LoraSettings(rslora=True, r=4, alpha=8),
                                      L.LoraSettings(dora=True, targets=["project_q", "project_v", "w_out"])])
def test_rslora_and_dora_adapters_mean_the_same_to_peft(tmp_path, base, settings):
    native, hf_dir = base
    model, _ = load_model(native)
    L.inject_lora(model, settings)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if L.is_lora_parameter(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    L.save_adapter(model, tmp_path / "adapter", settings, base_model=str(native))
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path / "adapter")).eval()
    texts = _texts(model.config.vocab_size, seed=3)
    assert (_theirs(peft_model, texts) - _ours(model.eval(), texts)).abs().max().item() < TOL


# ----- (2) peft tunes on HF, cpmctl applies --------------------------------------------------------------------
def _peft_trained_adapter(hf_dir: Path, out: Path, vocab_size: int):
    """A LoRA trained with peft on CpmAntForCausalLM: a few seeded Adam steps of next-token loss."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_hf(hf_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["project_k", "w_0"],
                                                   task_type="CAUSAL_LM"))
    model.train()
    batch = torch.tensor(_texts(vocab_size, lengths=(16, 16), seed=5))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(out))
    return model


def test_peft_adapter_from_hf_works_in_cpmctl_generate(tmp_path, base, tiny_vocab, capsys):
    native, hf_dir = base
    tokenizer = CPMAntTokenizer(tiny_vocab)
    peft_model = _peft_trained_adapter(hf_dir, tmp_path / "peft-adapter", tokenizer.vocab_size)

    prompt = "今天天气不错，我们"
    ids = [6] + tokenizer.encode(prompt)  # what cpmctl feeds its model for the prompt
    from transformers import GenerationConfig

    greedy = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=8, eos_token_id=7, pad_token_id=0)
    with torch.no_grad():
        hf_out = peft_model.generate(input_ids=torch.tensor([ids]), generation_config=greedy)[0, len(ids):].tolist()
    hf_ids = hf_out[: hf_out.index(7)] if 7 in hf_out else hf_out  # cpmctl's result excludes the eos
    assert hf_ids

    for model_dir in (hf_dir, native):  # the HF checkpoint itself, and the native one it came from
        code, stdout, err = run_cli(capsys, "generate", prompt, "--model", model_dir, "--adapter",
                                    tmp_path / "peft-adapter", "--decode", "greedy", "--max-new-tokens", "8",
                                    "--device", "cpu", "--json")
        assert code == 0, err
        assert json.loads(stdout)["token_ids"] == hf_ids, model_dir.name

    # Same logits too, and different from the base model's: the adapter has an effect.
    ours, _ = L.load_model_with_adapter(hf_dir, tmp_path / "peft-adapter")
    texts = _texts(tokenizer.vocab_size, seed=7)
    assert (_ours(ours, texts) - _theirs(peft_model, texts)).abs().max().item() < TOL
    assert (_ours(ours, texts) - _ours(load_model(hf_dir)[0], texts)).abs().max().item() > 1e-3


def test_peft_adapters_cpmctl_cannot_apply_are_refused(tmp_path, base, tiny_vocab):
    native, hf_dir = base
    from peft import LoraConfig, get_peft_model

    cases = {
        "layers": (LoraConfig(r=2, target_modules=["project_q"], layers_to_transform=[0]), "layers_to_transform"),
        "bias": (LoraConfig(r=2, target_modules=["project_q"], bias="lora_only"), "bias"),
        "head": (LoraConfig(r=2, target_modules=["project_q", "lm_head"]), "adapts lm_head"),
        "alpha": (LoraConfig(r=2, target_modules=["project_q"], alpha_pattern={"project_q": 4}), "alpha_pattern"),
    }
    for name, (config, message) in cases.items():
        get_peft_model(_hf(hf_dir), config).save_pretrained(str(tmp_path / name))
        with pytest.raises(CpmctlError, match=message):
            L.load_model_with_adapter(native, tmp_path / name)

    # Only part of the layers adapted (a regex target): missing keys, named, not a silent partial load.
    get_peft_model(_hf(hf_dir), LoraConfig(r=2, target_modules=r".*layers\.1\.self_att.*project_v")).save_pretrained(
        str(tmp_path / "regex"))
    with pytest.raises(CpmctlError, match="2 missing.*first missing: encoder.layers.0.self_att.self_attention.project_v"):
        L.load_model_with_adapter(native, tmp_path / "regex")


# ----- (3) pruned model -> HF ----------------------------------------------------------------------------------
def test_pruned_model_exported_to_hf_computes_the_pruned_model(tmp_path, tiny_vocab, capsys):
    vocab_size = CPMAntTokenizer(tiny_vocab).vocab_size
    pruned = build_model(tiny_config(vocab_size, num_layers=4, num_heads=2, dim_ff=40, mask_modules=MASK), seed=4)
    save_native(pruned, tmp_path / "pruned", vocab=tiny_vocab)
    code, stdout, err = run_cli(capsys, "model", "convert", tmp_path / "pruned", "--to", "hf", "--out",
                                tmp_path / "hf", "--json")
    assert code == 0, err
    assert json.loads(stdout)["tokenizer"] is True

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    # A zero-weight sub-block is exactly the skip: HF's residual h + block(h) gives h back, bit for bit.
    skipped = []
    for i, (no_attn, no_ffn) in enumerate(MASK):
        layer = hf.cpmant.encoder.layers[i]
        for module, dropped in ((layer.self_att, no_attn), (layer.ffn, no_ffn)):
            if dropped:
                module.register_forward_hook(lambda m, args, out: skipped.append(
                    torch.equal((out[0] if isinstance(out, tuple) else out), args[0])))
    texts = _texts(vocab_size, lengths=(9, 9), seed=2) + [_texts(vocab_size, lengths=(9,), seed=9)[0]]
    got = _theirs(hf, texts)
    assert skipped == [True] * 4 * 1  # 2 attention + 2 FFN sub-blocks dropped, one forward
    assert (got - _ours(pruned.eval(), texts)).abs().max().item() < TOL
    long = _texts(vocab_size, lengths=(200,), seed=3)  # distances in the logarithmic position buckets
    assert (_theirs(hf, long) - _ours(pruned, long)).abs().max().item() < TOL

    # The export is a complete HF model directory: AutoTokenizer and generate, local files only.
    pytest.importorskip("rjieba")  # transformers' CpmAntTokenizer needs it
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    encoded = tokenizer("今天天气不错", return_tensors="pt")
    assert encoded["input_ids"][0, 0].item() == 6  # <s> first, as cpmctl's generation input
    assert hf.generation_config.num_beams == 3 and hf.generation_config.begin_suppress_tokens == [7, 4]
    with torch.no_grad():
        out = hf.generate(**encoded, max_new_tokens=4)
    new = out[0, encoded["input_ids"].shape[1]:].tolist()
    assert 1 <= len(new) <= 4 and new[0] not in (4, 7)  # the first-step ban of eos and newline came along
    assert isinstance(tokenizer.decode(out[0]), str)


# ----- (4) untied head -----------------------------------------------------------------------------------------
def test_untied_lm_head_is_refused_not_replaced(tmp_path, base, capsys):
    _, hf_dir = base
    hf = _hf(hf_dir)
    with torch.no_grad():
        hf.lm_head.weight.add_(0.5)
    hf.save_pretrained(str(tmp_path / "untied"))
    with pytest.raises(CpmctlError, match=r"lm_head.weight differs from the input embedding \(max \|diff\| 0.5\)"):
        load_model(tmp_path / "untied")
    code, _, err = run_cli(capsys, "model", "convert", tmp_path / "untied", "--to", "native", "--out",
                           tmp_path / "native")
    assert code == 2 and "lm_head.weight differs" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "native").exists()
    # The tied head (what every CPM-Ant checkpoint has) reads as before.
    assert load_model(hf_dir)[0].config.num_layers == 2
