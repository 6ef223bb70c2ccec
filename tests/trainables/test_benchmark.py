"""The benchmark script runs the trials' own training step and reports rows a user can act on."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pandas as pd
import torch

from trainables import benchmark


def test_cpu_rows_per_model_read_back_from_the_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = benchmark.main(["--models", "mc3_18,r3d_18", "--shape", "16,16,12", "--batch-size", "2", "--amp", "both",
                           "--device", "cpu", "--warmup", "1", "--steps", "2", "--output", str(out)])
    assert code == 0
    table = pd.read_csv(out)
    # Autocast is CUDA-only in training, so "both" collapses to one fp32 row per model on a CPU.
    assert list(table["model"]) == ["mc3_18", "r3d_18"] and set(table["precision"]) == {"float32"}
    assert set(table["shape_xyz"]) == {"16x16x12"} and set(table["batch_size"]) == {2}
    assert np.allclose(table["train_volumes_per_s"], 2 / table["train_step_s"])
    # light runs on the device: a trial waits for the device data path, not for TorchIO (timed beside it).
    expected_fed = 2 / (table["train_step_s"] + 2 * table["data_ms_per_sample"] / 1000)
    assert np.allclose(table["fed_volumes_per_s"], expected_fed)
    assert (table["augment_s_per_volume"] > 0).all()
    assert np.allclose(table["torchio_ms_per_sample"], table["augment_s_per_volume"] * 1000)
    assert "peak_memory_gib" not in table  # a CUDA-only column
    assert "augmentation at strength 1.0" in capsys.readouterr().out


def test_heavy_augmentation_feeds_at_the_torchio_rate(tmp_path):
    out = tmp_path / "bench.csv"
    assert benchmark.main(["--models", "mc3_18", "--shape", "16,16,12", "--batch-size", "2", "--augmentation", "heavy",
                           "--device", "cpu", "--warmup", "0", "--steps", "1", "--output", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["data_ms_per_sample"] == pytest.approx(row["torchio_ms_per_sample"])
    assert row["fed_volumes_per_s"] == pytest.approx(2 / (row["train_step_s"] + 2 * row["augment_s_per_volume"]))


def test_no_augmentation_costs_nothing_and_the_cache_gives_the_shape(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"shape": [12, 16, 12], "channels": 2}))
    out = tmp_path / "bench.csv"
    assert benchmark.main(["--models", "mc3_18", "--cache", str(cache), "--augmentation", "none", "--device", "cpu",
                           "--warmup", "0", "--steps", "1", "--output", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["shape_xyz"] == "12x16x12" and row["augment_s_per_volume"] == 0
    # Without augmentation a trial still indexes, casts and permutes on the device: that, not TorchIO, feeds it.
    batch = row["batch_size"]
    assert row["fed_volumes_per_s"] == pytest.approx(batch / (row["train_step_s"] + batch * row["data_ms_per_sample"] / 1000))
    # Without the cache's subject count, the memory estimate counts the paper's 591 subjects, float16.
    assert row["subjects"] == 591 and np.isclose(row["fold_data_mb"], 591 * 2 * 12 * 16 * 12 * 2 / 2**20)


def test_the_fold_on_the_device_is_counted_from_the_cache_or_subjects(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"shape": [8, 8, 8], "channels": 1, "n_subjects": 60}))
    out = tmp_path / "bench.csv"
    common = ["--models", "mc3_18", "--cache", str(cache), "--augmentation", "none", "--device", "cpu",
              "--warmup", "0", "--steps", "1", "--output", str(out)]
    assert benchmark.main(common) == 0
    row = pd.read_csv(out).iloc[0]
    assert row["subjects"] == 60 and np.isclose(row["fold_data_mb"], 60 * 512 * 2 / 2**20)
    assert benchmark.main([*common, "--subjects", "1000"]) == 0
    assert pd.read_csv(out).iloc[0]["fold_data_mb"] == 1000 * 512 * 2 / 2**20
    assert benchmark.main([*common, "--subjects", "0"]) == 2
    assert "--subjects must be at least 1, got 0" in capsys.readouterr().err


def test_bad_options_are_named(capsys):
    assert benchmark.main(["--models", "resnet50"]) == 2
    assert "--models: unknown ['resnet50']" in capsys.readouterr().err
    assert benchmark.main(["--shape", "16,16"]) == 2
    assert "--shape takes three positive sizes" in capsys.readouterr().err
    assert benchmark.main(["--augmentation", "strong"]) == 2
    assert "augmentation must be one of none, light, heavy" in capsys.readouterr().err


def test_a_cache_folder_that_is_not_an_entry_names_the_entries_in_it(tmp_path, capsys):
    """OUT/cache instead of OUT/cache/<key> (an easy slip) ended in a FileNotFoundError traceback."""
    entry = tmp_path / "cache" / "0123abcd"
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text(json.dumps({"shape": [8, 8, 8], "channels": 1, "n_subjects": 3}))
    assert benchmark.main(["--cache", str(tmp_path / "cache")]) == 2
    assert (f"--cache {tmp_path / 'cache'} is not a prepared cache entry (no readable meta.json): give the "
            f"OUT/cache/<key> folder that a run printed; it holds the entry 0123abcd: give {entry}"
            in capsys.readouterr().err)
    assert benchmark.main(["--cache", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("give the OUT/cache/<key> folder that a run printed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where PyTorch sees no CUDA device")
def test_cuda_asked_for_without_a_device_is_named(capsys):
    assert benchmark.main(["--device", "cuda"]) == 2
    assert "--device cuda: PyTorch sees no CUDA device here" in capsys.readouterr().err


def test_issue_columns_flops_data_paths_and_checkpoint_size(tmp_path, capsys):
    from models import build_model

    out = tmp_path / "bench.csv"
    assert benchmark.main(["--models", "mc3_18", "--shape", "16,16,12", "--batch-size", "2", "--device", "cpu",
                           "--warmup", "1", "--steps", "2", "--output", str(out)]) == 0
    table = pd.read_csv(out)
    for column in ["model", "device", "precision", "batch_size", "trials_per_device", "samples_per_s", "step_ms",
                   "data_ms_per_sample", "torchio_ms_per_sample", "achieved_tflops", "peak_tflops", "peak_fraction",
                   "checkpoint_mb_per_epoch", "peak_memory_mb", "flops_per_step",
                   "train_step_s", "train_volumes_per_s", "augment_s_per_volume"]:  # today's columns stay
        assert column in table, column
    row = table.iloc[0]
    assert row["trials_per_device"] == 1 and row["flops_per_step"] > 0
    step_s = row["step_ms"] / 1000
    assert np.isclose(row["achieved_tflops"], row["flops_per_step"] / step_s / 1e12)
    assert np.isclose(row["samples_per_s"], 2 / step_s)
    # No peak figure for a CPU, so no fraction of it; no CUDA memory either.
    assert pd.isna(row["peak_tflops"]) and pd.isna(row["peak_fraction"]) and pd.isna(row["peak_memory_mb"])
    assert row["data_ms_per_sample"] > 0 and row["torchio_ms_per_sample"] > 0
    assert np.isclose(row["torchio_ms_per_sample"], 1000 * row["augment_s_per_volume"])
    # The checkpoint: weights + Adam's two moments of every parameter (+ BatchNorm buffers, step counters).
    model = build_model("mc3_18", num_classes=3, in_channels=1)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert np.isclose(row["checkpoint_mb_per_epoch"], (weights + moments) / 2**20, rtol=0.01)
    printed = capsys.readouterr().out
    assert "Concurrent trials per device and CUDA MPS: skipped on a CPU" in printed
    # This CPU build runs float32 3-D convolutions in oneDNN; the row and the printed line say so.
    assert row["conv_backend"] == "mkldnn" and not row["mps"]
    assert "Convolution kernels (torch.profiler): mc3_18 float32: mkldnn." in printed
    assert row["torch_version"] == __import__("torch").__version__ and pd.isna(row["cudnn_version"])


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch, on leaving the flags block
def test_convolution_backends_name_the_kernel_that_ran():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    batch, labels = torch.randn(2, 1, 5, 6, 6), torch.tensor([0, 2])
    model(batch)
    optimizer = torch.optim.Adam(model.parameters())
    criterion = nn.CrossEntropyLoss()
    before = model[0].weight.detach().clone()
    assert benchmark.convolution_backends(model, batch, labels, criterion, optimizer, None, None) == ["mkldnn"]
    assert not torch.equal(model[0].weight, before)  # it took a real step
    # Without oneDNN, torch falls back to its native kernel: the slow path the check exists to catch on a GPU.
    with torch.backends.mkldnn.flags(enabled=False):
        assert benchmark.convolution_backends(model, batch, labels, criterion, optimizer, None,
                                              None) == ["slow_conv3d"]


def test_backend_verdict_warns_on_cuda_when_a_row_left_cudnn():
    import torch

    table = pd.DataFrame({"model": ["mc3_18", "mc3_18", "mc3_18"], "precision": ["float32", "bfloat16", "bfloat16"],
                          "trials_per_device": [1, 1, 2], "conv_backend": ["cudnn", "slow_conv3d", "slow_conv3d"]})
    verdict = benchmark._backend_verdict(table, torch.device("cuda"))
    assert verdict.startswith("WARNING: convolutions did not all run in cuDNN")
    assert "mc3_18 float32: cudnn, mc3_18 bfloat16: slow_conv3d" in verdict
    table["conv_backend"] = "cudnn"
    assert benchmark._backend_verdict(table, torch.device("cuda")).startswith(
        "Convolution kernels (torch.profiler): cuDNN in every row")


def test_memory_format_and_compile_rows(tmp_path):
    import torch

    out = tmp_path / "bench.csv"
    assert benchmark.main(["--models", "mc3_18", "--shape", "8,8,8", "--device", "cpu", "--warmup", "0",
                           "--steps", "1", "--memory-format", "channels_last_3d", "--compile", "both",
                           "--output", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table["memory_format"]) == ["channels_last_3d"] * 2 and list(table["compiled"]) == [False, True]
    # Compile time is reported apart from the step time, and only where something was compiled.
    assert pd.isna(table["compile_s"][0]) and table["compile_s"][1] > 0
    assert table["flops_per_step"][0] == table["flops_per_step"][1]  # same arithmetic, other kernels
    # Two channels: with one, both layouts have the same strides and the check could not fail.
    model, *_, batch, _ = benchmark._setup("mc3_18", (8, 8, 8), 2, 2, torch.device("cpu"), False,
                                           benchmark.StepVariant("channels_last_3d"))
    assert batch.is_contiguous(memory_format=torch.channels_last_3d) and not batch.is_contiguous()
    weight = model.stem[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    with pytest.raises(ValueError, match="memory_format must be one of contiguous, channels_last_3d, got 'nhwc'"):
        benchmark.StepVariant("nhwc")
    # The 2-D slice baseline: Module.to(memory_format=channels_last_3d) failed on its 4-D weights
    # ("required rank 5 tensor"); its 2-D convolutions take channels_last instead.
    model, *_ = benchmark._setup("resnet18_2d", (8, 8, 8), 2, 2, torch.device("cpu"), False,
                                 benchmark.StepVariant("channels_last_3d"))
    conv2d = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv2d.weight.is_contiguous(memory_format=torch.channels_last) and not conv2d.weight.is_contiguous()


def test_checkpoint_bytes_of_a_tiny_model_by_hand():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 1, 5, 5, 5))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 5, 5, 5)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())  # 4*27+4 + 4+4 + 3*108+3 = 447
    assert params == 447
    # fp32 weights, exp_avg, exp_avg_sq; BatchNorm running mean/var (fp32) and num_batches_tracked (int64).
    by_hand = 3 * 4 * params + 2 * 4 * 4 + 8
    assert np.isclose(benchmark.checkpoint_bytes(model, optimizer), by_hand, rtol=0.01)


def test_peak_table_knows_gpus_by_name_only_on_cuda(monkeypatch):
    import torch

    assert benchmark.peak_tflops(torch.device("cpu"), "bfloat16") is None
    for name, precision, expected in [("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
                                      ("NVIDIA H100 PCIe", "bfloat16", 756.0), ("NVIDIA H200", "bfloat16", 989.0),
                                      ("NVIDIA A100-SXM4-80GB", "float16", 312.0), ("NVIDIA L4", "bfloat16", 121.0),
                                      ("Tesla T4", "float16", 65.0), ("Tesla V100-SXM2-16GB", "float16", 125.0),
                                      # PCIe and NVL cards share their SXM sibling's name: listed first
                                      ("NVIDIA H100 NVL", "bfloat16", 835.0), ("NVIDIA H200 NVL", "bfloat16", 835.0),
                                      ("Tesla V100-PCIE-32GB", "float16", 112.0),
                                      ("Tesla V100S-PCIE-32GB", "float32", 16.4),
                                      ("NVIDIA L40S", "bfloat16", None), ("Some GPU", "float16", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert benchmark.peak_tflops(torch.device("cuda"), precision) == expected, name


def test_concurrent_processes_report_an_aggregate_rate():
    # main runs this on CUDA only; the mechanism itself works on any device.
    import torch

    samples_per_s, step_s = benchmark.concurrent_rate(2, "mc3_18", (8, 8, 8), 1, 1, torch.device("cpu"), False, 0, 1)
    assert samples_per_s > 0 and step_s > 0


def test_a_concurrency_worker_that_gets_no_go_stops_without_timing():
    """When a sibling dies before "ready", the parent closes the others' stdin: they must not run the timed steps."""
    import subprocess
    import sys

    spec = json.dumps({"model": "mc3_18", "shape": [8, 8, 8], "batch_size": 1, "channels": 1, "device": "cpu",
                       "amp": False, "warmup": 0, "steps": 1, "memory_format": "contiguous", "compiled": False})
    worker = subprocess.Popen([sys.executable, "-m", "trainables.benchmark", "--concurrency-worker", spec],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    worker.stdin.close()
    assert worker.wait(timeout=120) == 0 and worker.stdout.read() == ""


def test_bad_concurrency_is_named(capsys):
    assert benchmark.main(["--concurrency", "0,2"]) == 2
    assert "--concurrency takes positive process counts" in capsys.readouterr().err
