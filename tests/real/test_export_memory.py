"""Stage two's memory at real size, checked on small models: a bf16 run loads, exports and writes bf16 with no
float32 copy of the model, and the export never copies the whole module. Peaks are the growth of the resident
set in a fresh process (stages/bench_memory.py), compared with the model's own bytes.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.backends.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("export-memory") / "sd3")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """An SD3-shaped model of 20 M parameters stored in bf16: big enough that its bytes dwarf the noise."""
    from stages.bench_memory import build_model

    return build_model(tmp_path_factory.mktemp("export-memory-wide") / "sd3", "sd3", layers=4)


def lora_model(path, dtype):
    """The tiny transformer in `dtype` with a trained-looking adapter (B != 0), r = 4, alpha = 8."""
    from peft import LoraConfig

    from pipeline.backends.base import load_transformer
    from stages.train import LORA_TARGETS

    model = load_transformer("sd3", str(path), dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p, dtype=torch.float32) * 0.3)
    return model.to(dtype)


def experiment(model, *overrides):
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, overrides=["model.backend=sd3", f"model.path={model}", "train.lora_rank=4",
                                                "train.lora_alpha=8", *overrides])


def stored(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_export_copies_no_module(tiny, tmp_path, one_rank, monkeypatch):
    """The export streams the weights tensor by tensor; a deep copy of the module would double it on the GPU."""
    from pipeline.runs import export

    real = copy.deepcopy

    def no_module_copy(obj, *a, **k):
        assert not isinstance(obj, torch.nn.Module), "export deep-copied the module"
        return real(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copy)
    model = lora_model(tiny, torch.float32)
    export(SimpleNamespace(module=model), experiment(tiny), tmp_path / "export", lora=True, rank=0)
    assert (tmp_path / "export" / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("export_dtype, want", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_run_exports_in_its_precision(tiny, tmp_path, one_rank, export_dtype, want):
    """A bf16 LoRA run writes bf16 (train.export_dtype=auto) or what train.export_dtype asks; the merged weights
    are peft's `merge_and_unload` of the same model, and the adapter file holds the adapter."""
    from pipeline.runs import export

    model = lora_model(tiny, torch.bfloat16)
    expected = copy.deepcopy(model)
    for m in expected.modules():  # peft's merge, computed independently of the export
        if hasattr(m, "merge") and hasattr(m, "lora_A"):
            m.merge()
    plain = {k.replace(".base_layer.", "."): v for k, v in expected.state_dict().items() if ".lora_" not in k}
    cfg = experiment(tiny, "train.precision=bf16", f"train.export_dtype={export_dtype}")
    folder = export(SimpleNamespace(module=model), cfg, tmp_path / "export", lora=True, rank=0)
    got = stored(folder / "transformer")
    assert got.keys() == plain.keys()
    assert {v.dtype for v in got.values()} == {want}
    for k, v in plain.items():  # bf16: the sum rounded once here, twice by peft
        torch.testing.assert_close(got[k].float(), v.float(), rtol=1.6e-2, atol=1e-2)
    adapter = stored(folder / "lora")
    assert adapter and {v.dtype for v in adapter.values()} == {want}


def test_bf16_load_keeps_buffers_float32_and_rounds_weights_once(tiny):
    """load_transformer in bf16 = the float32 load with its parameters cast as DeepSpeed casts them (buffers,
    SD3's position table, stay float32)."""
    from pipeline.backends.base import load_transformer

    full, half = load_transformer("sd3", str(tiny)), load_transformer("sd3", str(tiny), torch.bfloat16)
    for (n, p), (_, q) in zip(full.named_parameters(), half.named_parameters(), strict=True):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), n
    buffers = dict(half.named_buffers())
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    for n, b in full.named_buffers():
        torch.testing.assert_close(buffers[n], b, rtol=0, atol=0)


def test_bf16_load_holds_no_float32_copy(wide):
    """Loading a bf16 model in bf16 grows the process by less than its bf16 bytes plus a margin; a float32 load
    (4 bytes a parameter, plus the mapped file) does not fit."""
    from stages.bench_memory import measure

    row = measure("sd3", wide, "load")
    assert row["params"] > 15e6
    assert row["load"] < 3.0 * row["params"], row  # 2 bytes a parameter + 1 of slack


def test_export_peak_stays_under_the_model_bytes(wide):
    """A bf16 LoRA export (merge included) peaks under the bf16 model's bytes; copying the module in float32 and
    loading a second transformer took about 10 bytes a parameter."""
    from stages.bench_memory import measure

    row = measure("sd3", wide, "export", lora=True)
    assert row["export_bytes"] < 2.1 * row["params"]  # written in bf16
    assert row["export"] < 2.0 * row["params"], row
