"""MFU's FLOPs formula and peak table, and `logging:` mirrors (TensorBoard, W&B offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instar.config.load import load_recipe
from instar.data.tokenizer import build_char_tokenizer
from instar.errors import ContractError
from instar.graph.plan import make_plan
from instar.graph.runner import run_recipe
from instar.models.build import model_from_config
from instar.trainer.flops import MfuMeter, flops_model, matmul_params, peak_tflops
from tests.conftest import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _pipeline_model_config() -> dict:
    return yaml.safe_load((ROOT / "recipes/tiny/pipeline.yaml").read_text())["model"]["config"]


def test_flops_per_token_of_the_tiny_pipeline_llama_by_hand():
    # recipes/tiny/pipeline.yaml: hidden 128, MLP 512, 2 layers, 4 heads, tied embeddings,
    # instar-char's 100 tokens. Per layer: q,k,v,o 4*128*128 + gate,up,down 3*128*512 + 2 norms of 128.
    per_layer = 4 * 128 * 128 + 3 * 128 * 512 + 2 * 128
    n = 2 * per_layer + 128 + 100 * 128  # + final norm + the tied embedding, counted once as the LM head
    model = model_from_config(_pipeline_model_config(), build_char_tokenizer(), seed=0)
    assert matmul_params(model) == n == 537_728
    fm = flops_model(model)
    assert (fm.n_layers, fm.n_heads, fm.head_dim) == (2, 4, 32)
    assert fm.flops_per_token(128) == 6 * 537_728 + 12 * 2 * 4 * 32 * 128 == 3_619_584


def test_untied_input_embedding_is_not_counted_but_the_head_is():
    cfg = _pipeline_model_config() | {"tie_word_embeddings": False}
    model = model_from_config(cfg, build_char_tokenizer(), seed=0)
    total = sum(p.numel() for p in model.parameters())
    assert total == 537_728 + 100 * 128  # the separate input table exists...
    assert matmul_params(model) == 537_728  # ...but a lookup is no matmul


def test_grouped_query_attention_uses_query_heads_and_head_dim():
    cfg = _pipeline_model_config() | {"num_key_value_heads": 1, "head_dim": 16}
    fm = flops_model(model_from_config(cfg, build_char_tokenizer(), seed=0))
    assert (fm.n_heads, fm.head_dim) == (4, 16)
    # q and o are 128x64, k and v 128x16 (one K/V head of 16)
    assert fm.n_params == 2 * (2 * 128 * 64 + 2 * 128 * 16 + 3 * 128 * 512 + 2 * 128) + 128 + 100 * 128


@pytest.mark.parametrize("name, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", 989.4, 1978.9),
    ("NVIDIA H100 PCIe", 756.0, 1513.0),
    ("NVIDIA H100 NVL", 835.0, 1671.0),
    ("NVIDIA H200", 989.4, 1978.9),
    ("NVIDIA GH200 480GB", 989.4, 1978.9),
    ("NVIDIA A100-SXM4-80GB", 312.0, None),
    ("NVIDIA A100 80GB PCIe", 312.0, None),
    ("NVIDIA L40S", 362.05, 733.0),
    ("NVIDIA L4", 121.0, 242.5),
    ("NVIDIA B200", 2250.0, 4500.0),
])
def test_peak_table_picks_the_most_specific_name(name, bf16, fp8):
    assert peak_tflops(name) == (bf16, fp8)


def test_mfu_on_cpu_and_unknown_gpus_is_absent_with_one_note():
    model = model_from_config(_pipeline_model_config(), build_char_tokenizer(), seed=0)
    cpu = MfuMeter(model, 128, 1, fp8=False, device_name=None)
    assert cpu.step_metrics(10_000, 1.0) == {} and cpu.note is None
    odd = MfuMeter(model, 128, 1, fp8=False, device_name="Quadro FX 580")
    assert odd.step_metrics(10_000, 1.0) == {}
    assert "Quadro FX 580" in odd.note and "PEAK_TFLOPS" in odd.note


def test_mfu_value_on_a_listed_gpu():
    model = model_from_config(_pipeline_model_config(), build_char_tokenizer(), seed=0)
    meter = MfuMeter(model, 128, world_size=2, fp8=True, device_name="NVIDIA H100 80GB HBM3")
    m = meter.step_metrics(tokens=1_000_000, seconds=0.5)  # 2 GPUs together
    per_gpu = 1_000_000 * 3_619_584 / 0.5 / 2
    assert m["mfu"] == pytest.approx(per_gpu / 989.4e12)
    assert m["mfu_fp8"] == pytest.approx(per_gpu / 1978.9e12)


def _logging_recipe(logging: dict, steps: int = 4) -> dict:
    recipe = tiny_recipe()
    recipe["stages"] = {"pretrain": recipe["stages"]["pretrain"]}
    recipe["stages"]["pretrain"]["train"] = {"steps": steps}
    recipe["defaults"]["logging"] = logging
    return recipe


def test_logging_settings_do_not_change_fingerprints(tmp_path: Path):
    plain = write_recipe(tmp_path, _logging_recipe({}), "a.yaml")
    logged = write_recipe(tmp_path, _logging_recipe({"tensorboard": True, "wandb": {"project": "p"}}), "b.yaml")
    a = {p.name: p.fingerprint for p in make_plan(load_recipe(plain))}
    b = {p.name: p.fingerprint for p in make_plan(load_recipe(logged))}
    assert a == b


def test_tensorboard_event_files_hold_every_step(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = write_recipe(tmp_path, _logging_recipe({"tensorboard": True}))
    run_recipe(load_recipe(path), quiet=True)
    run_dir = tmp_path / "runs/t"
    records = [json.loads(x) for x in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard/pretrain"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"pretrain/loss", "pretrain/lr", "pretrain/grad_norm", "pretrain/tokens_per_s",
            "pretrain/exact_match/plain"} <= set(tags)
    loss = acc.Scalars("pretrain/loss")
    assert [e.step for e in loss] == [r["step"] for r in records] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.step for e in acc.Scalars("pretrain/exact_match/plain")] == [4]


def _wandb_records(raw: bytes) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    LevelDB-log records (crc32, 2-byte length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks.
    wandb 0.31 ships no Python reader (its core is in Go), so this one is here."""
    import struct
    import zlib

    assert raw[:7] == b":W&B\xe1\xbe\x00", raw[:7]
    out, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + data) & 0xFFFFFFFF == crc or kind == 0
        pos += 7 + length
        if kind == 0:
            break
        pending += data
        if kind in (1, 4):  # FULL or LAST
            out.append(pending)
            pending = b""
    return out


def test_wandb_offline_writes_its_run_without_network(tmp_path: Path):
    path = write_recipe(tmp_path, _logging_recipe({"wandb": {"project": "instar-test"}}, steps=3))
    env = {**os.environ, "WANDB_MODE": "offline", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    # Its own process: wandb starts a service process and keeps global state.
    proc = subprocess.run([sys.executable, "-m", "instar.cli", "run", str(path), "--quiet"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "runs/t/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    from wandb.proto import wandb_internal_pb2

    history = []
    for data in _wandb_records(runs[0].read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    losses = [h["pretrain/loss"] for h in history if "pretrain/loss" in h]
    records = [json.loads(x) for x in (tmp_path / "runs/t/pretrain/metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in records], rel=1e-6) and len(losses) == 3


def test_a_missing_writer_package_is_a_clear_error(tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = write_recipe(tmp_path, _logging_recipe({"wandb": {}}))
    with pytest.raises(ContractError, match=r"logging.wandb` needs the `wandb` package.*pip install 'instar\[logging\]'"):
        run_recipe(load_recipe(path), quiet=True)


def test_wandb_mode_other_than_offline_is_refused(tmp_path: Path):
    from instar.errors import RecipeError

    path = write_recipe(tmp_path, _logging_recipe({"wandb": {"mode": "online"}}))
    with pytest.raises(RecipeError, match="mode"):
        load_recipe(path)
