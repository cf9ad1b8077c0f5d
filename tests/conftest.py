"""Shared fixtures: a tiny vocabulary and config built in-process, and the original ant.txt when ../shared exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpmctl.model.config import CPMAntConfig
from cpmctl.model.tokenizer import SPECIAL_TOKENS

import torch

# Tiny models are all small ops: on shared CPUs, one intra-op thread is 10-50x faster than waiting at OpenMP
# barriers for a descheduled second thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _scratch_in_tmp(tmp_path_factory):
    """Memory-limited int8 / int4 runs write a (deleted-at-once) scratch file: in the session's tmp, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CPMCTL_SCRATCH_DIR", str(tmp_path_factory.mktemp("scratch")))
        yield


REPO = Path(__file__).resolve().parent.parent
ANT_VOCAB = REPO.parent / "shared" / "reference" / "ant.txt"

# Enough characters and words for test sentences; the rest of the text maps to <unk>.
_CHARS = (
    "的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它头经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感"
    "今气不错，。！？、：；“”（）《》春夏秋冬山水风雨花草树木河湖海江城市北京上海中国人民学校老师同学朋友工作生活时间世界问题发展经济社会文化历史科学技术研究数据模型语言训练"
)
_WORDS = ["今天", "天气", "不错", "中国", "北京", "我们", "他们", "学生", "老师", "学校", "工作", "生活", "时间", "世界",
          "问题", "发展", "经济", "社会", "文化", "历史", "科学", "技术", "研究", "数据", "模型", "语言", "训练", "一个"]
_ASCII = [chr(c) for c in range(33, 127)] + ["hello", "world", "20", "23"]


def write_tiny_vocab(path: Path) -> Path:
    seen, tokens = set(SPECIAL_TOKENS), list(SPECIAL_TOKENS)
    for t in _ASCII + list(_CHARS) + _WORDS:
        if t not in seen:
            seen.add(t)
            tokens.append(t)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_vocab(tmp_path_factory) -> Path:
    return write_tiny_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture(scope="session")
def ant_vocab() -> Path:
    if not ANT_VOCAB.exists():
        pytest.skip("../shared/reference/ant.txt is not available")
    return ANT_VOCAB


def tiny_config(vocab_size: int, **overrides) -> CPMAntConfig:
    base = dict(vocab_size=vocab_size, dim_model=64, dim_ff=96, num_layers=2, num_heads=4, dim_head=16, half=False)
    base.update(overrides)
    return CPMAntConfig(**base)


def write_tiny_ladder(root: Path, max_length: int = 96, words: int | None = None) -> int:
    """The pruning tests' setup in `root`: vocab.txt, packed synthetic rows in data/, configs t0 (4 layers, 4 heads,
    dim_ff 48), t1 (t0 minus three sub-blocks), t2 (t1 at 2 heads, dim_ff 20), wide (t0 at dim_model 32), and m0, a
    native checkpoint of t0. Returns the vocabulary size."""
    from cpmctl.model.ant import build_model
    from cpmctl.model.checkpoint import save_native
    from cpmctl.model.tokenizer import CPMAntTokenizer
    from tests.synthetic import write_synthetic_packed

    vocab = write_tiny_vocab(root / "vocab.txt")
    n = CPMAntTokenizer(vocab).vocab_size
    write_synthetic_packed(root / "data", n, 40, max_length=max_length, seed=0, words=words)
    dropped = [[False, False], [True, False], [False, True], [False, True]]
    configs = {
        "t0": tiny_config(n, num_layers=4, num_heads=4, dim_ff=48),
        "t1": tiny_config(n, num_layers=4, num_heads=4, dim_ff=48, mask_modules=dropped),
        "t2": tiny_config(n, num_layers=4, num_heads=2, dim_ff=20, mask_modules=dropped),
        "wide": tiny_config(n, dim_model=32, num_layers=4, num_heads=4, dim_ff=48),
    }
    for name, cfg in configs.items():
        cfg.save(root / f"{name}.json")
    save_native(build_model(configs["t0"], seed=0), root / "m0", vocab=vocab)
    return n


@pytest.fixture
def tiny_cfg(tiny_vocab) -> CPMAntConfig:
    from cpmctl.model.tokenizer import CPMAntTokenizer

    return tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size)


@pytest.fixture
def config(tmp_path, tiny_vocab) -> Path:
    """A tiny config JSON fitting the tiny vocabulary."""
    from cpmctl.model.tokenizer import CPMAntTokenizer

    path = tmp_path / "tiny.json"
    tiny_config(CPMAntTokenizer(tiny_vocab).vocab_size).save(path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`cpmctl ARGV` in-process through the real entry point: (exit code, stdout, stderr)."""
    from cpmctl.cli.app import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def random_inputs(vocab_size: int, seed: int = 0, b: int = 2, n: int = 24, two_spans: bool = False):
    """Random model inputs: 4 prompt slots of task 2, then text with mixed context; optionally two spans per row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (b, n), generator=g)
    ids[:, :4] = vocab_size + 64 + torch.arange(4)
    segment = torch.full_like(ids, 2)
    segment[:, :4] = 0
    context = torch.rand(b, n, generator=g) > 0.4
    span = torch.zeros_like(ids)
    if two_spans:
        span[:, n // 2 :] = 1
    return ids, segment, context, span
