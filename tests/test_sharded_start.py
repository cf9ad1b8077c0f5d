"""Sharded start-up (train/sharded_start.py) on 2 gloo ranks: a model built straight into FSDP2 shards holds the
same bits as one process's full load, for `init: new` and for each checkpoint format; LoRA on a sharded base (fp32 or
bf16, fp32 adapters) starts from the same adapter weights as one process.

Run as a script under torchrun, this file is the worker: it writes the gathered state of each case to OUT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402
from cpmctl.model.ant import build_model  # noqa: E402
from cpmctl.model.checkpoint import convert, load_model, save_native, save_original  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 120
SEED = 5


def write_checkpoints(root: Path) -> dict[str, Path]:
    model = build_model(tiny_config(VOCAB), seed=SEED)
    native = save_native(model, root / "native")
    pt, _ = save_original(model, root / "original" / "model.pt")
    half, _ = save_original(model, root / "half" / "model.pt", dtype=torch.float16)
    hf = convert(native, "hf", root / "hf")
    return {"native": native, "original": pt, "original-fp16": half, "hf": hf}


def worker(root: str) -> None:
    import torch.distributed as dist

    from cpmctl.model.lora import LoraSettings, inject_lora, lora_initial_value
    from cpmctl.train.checkpointing import full_copy
    from cpmctl.train.engine import Engine
    from cpmctl.train.engine import is_sharded
    from cpmctl.train.sharded_start import init_sharded, load_sharded

    dist.init_process_group("gloo")
    rank, cpu = dist.get_rank(), torch.device("cpu")
    engine = Engine("fsdp", cpu, rank, rank, dist.get_world_size())
    paths = {name: Path(root) / sub for name, sub in (("native", "native"), ("original", "original/model.pt"),
                                                       ("original-fp16", "half/model.pt"), ("hf", "hf"))}
    cases = {"init": lambda: init_sharded(tiny_config(VOCAB), cpu, SEED)}
    for name, path in paths.items():
        cases[name] = lambda path=path: load_sharded(path, cpu)[0]

    def with_lora(dtype):
        def add(m):
            inject_lora(m, LoraSettings(r=4))
            for p in m.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 adapters on a bf16 base, as tune lora keeps them

        generator = torch.Generator().manual_seed(SEED)
        return load_sharded(paths["native"], cpu, dtype=dtype, prepare=add,
                            extra=lambda name, shape: lora_initial_value(name, shape, generator))[0]

    cases["lora"] = lambda: with_lora(torch.float32)
    cases["lora-bf16"] = lambda: with_lora(torch.bfloat16)

    def resumed():  # resuming a full-format checkpoint under fsdp: saved whole, copied row by row into the shards
        from cpmctl.train.checkpointing import restore_params

        model = init_sharded(tiny_config(VOCAB), cpu, SEED + 1)
        restore_params(model, Path(root) / "full-checkpoint")
        return model

    cases["resumed"] = resumed
    for name, make in cases.items():
        model = make()
        assert is_sharded(model)
        held = sum(p.to_local().numel() for p in model.parameters())
        full = full_copy(model, engine)
        if rank == 0:
            torch.save({"state": {k: v.detach().clone() for k, v in full.state_dict().items()},
                        "held": held, "total": sum(p.numel() for p in full.parameters())}, Path(root) / f"{name}.pt")
    dist.destroy_process_group()


def test_sharded_start_holds_the_same_bits_as_a_full_load(tmp_path):
    from safetensors.torch import save_file

    from cpmctl.model.lora import LoraSettings, init_lora_weights, inject_lora
    from cpmctl.train.checkpointing import PARAMS_FILE

    paths = write_checkpoints(tmp_path)
    saved = tmp_path / "full-checkpoint" / PARAMS_FILE
    saved.parent.mkdir(parents=True)
    save_file(build_model(tiny_config(VOCAB), seed=SEED).state_dict(), str(saved))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    references = {"init": build_model(tiny_config(VOCAB), seed=SEED).state_dict()}
    references["resumed"] = references["init"]
    for name, path in paths.items():
        references[name] = load_model(path)[0].state_dict()
    for name, dtype in (("lora", torch.float32), ("lora-bf16", torch.bfloat16)):
        lora = load_model(paths["native"], dtype=dtype)[0]
        inject_lora(lora, LoraSettings(r=4))
        for p in lora.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        init_lora_weights(lora, SEED)
        references[name] = lora.state_dict()
    for name, reference in references.items():
        got = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert got["state"].keys() == reference.keys(), name
        for key, value in reference.items():
            assert torch.equal(got["state"][key], value), f"{name}: {key}"
        # Each rank holds about half of the parameters (dim 0 split in two), not the whole model.
        assert got["held"] <= got["total"] * 0.5 + 2000, name


def test_a_damaged_checkpoint_is_refused_before_any_weight_is_read(tmp_path):
    from cpmctl import CpmctlError
    from cpmctl.train.sharded_start import open_checkpoint

    paths = write_checkpoints(tmp_path)
    weights = paths["native"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:6])
    with pytest.raises(CpmctlError, match="not a safetensors file"):
        open_checkpoint(paths["native"])
    config = paths["original"].with_suffix(".json")
    fields = json.loads(config.read_text())
    fields["num_layers"] += 1
    config.write_text(json.dumps(fields))
    with pytest.raises(CpmctlError, match="does not match its config"):
        open_checkpoint(paths["original"])


if __name__ == "__main__":
    worker(sys.argv[1])
