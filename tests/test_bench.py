"""The benchmark (sru_cupy.bench) on the CPU: what it times, the tables and files it writes, the
start-up measurement and its argument checks. Tiny configurations keep it fast; the figures
themselves are not asserted (performance is shown by the benchmark, not tested)."""

import json

import pytest

torch = pytest.importorskip("torch", reason="the benchmark times PyTorch models")

from sru_cupy import bench  # noqa: E402

TINY = [
    {"name": "tiny", "L": 5, "B": 3, "d": 8, "layers": 1, "bidirectional": False},
    {"name": "tiny-2layer-bi", "L": 4, "B": 2, "d": 6, "layers": 2, "bidirectional": True},
    {"name": "tiny-gpu", "L": 3, "B": 2, "d": 4, "layers": 1, "bidirectional": False,
     "gpu_only": True},
]
CPU = torch.device("cpu")


def _sru_package_works():
    try:
        import sru  # noqa: F401
        return True
    except Exception:
        return False


@pytest.fixture
def tiny_configs(monkeypatch):
    monkeypatch.setattr(bench, "CONFIGS", TINY)
    # The real start-up measurement has its own test; here a marker value proves it is reported
    # as measured.
    monkeypatch.setattr(bench, "startup_cost", lambda device: {
        "first call, cold cache": 1.25, "first call, warm cache": 0.0125})


def test_run_times_every_model_and_writes_json_markdown_and_chart(tiny_configs, tmp_path):
    printed = []
    out = tmp_path / "results"
    result = bench.run("cpu", out_dir=str(out), repeats=2, warmup=1, echo=printed.append)

    configs = ["tiny", "tiny-2layer-bi"]  # the GPU-only one is left out on the CPU
    models = {"sru_cupy SRU", "torch LSTM", "conv k=3"} | (
        {"sru package"} if _sru_package_works() else set())
    for config in configs:
        rows = [r for r in result["layers"] if r["config"] == config]
        assert {r["model"] for r in rows} == models, (config, rows, result["skipped"])
        for r in rows:
            assert r["dtype"] == "float32"
            for key in ("forward", "forward_backward"):
                low, high = r[f"{key}_ms_iqr"]
                assert 0 < low <= r[f"{key}_ms"] <= high, r
                low, high = r[f"{key}_ratio_iqr"]
                assert 0 < low <= r[f"{key}_ratio"] <= high, r
        sru = next(r for r in rows if r["model"] == "sru_cupy SRU")
        # the SRU against itself, round by round: exactly 1 with no spread
        assert sru["forward_ratio"] == sru["forward_backward_ratio"] == 1.0
        assert sru["forward_ratio_iqr"] == [1.0, 1.0]
        kernels = [r for r in result["recurrence"] if r["config"] == config]
        assert [r["kernel"] for r in kernels] == ["forward (training)", "forward (inference)",
                                                  "backward"]
        L, B, D = next((c["L"], c["B"], c["d"]) for c in TINY if c["name"] == config)
        for r in kernels:
            assert r["ms"] > 0 and r["floor_ms"] > 0
            low, high = r["percent_of_floor_iqr"]
            assert 0 < low <= r["percent_of_floor"] <= high
            assert r["ns_per_element_per_core"] == pytest.approx(
                r["ms"] * 1e6 * result["threads"] / (L * B * D))
    assert {r["config"] for r in result["layers"]} == set(configs)
    assert result["copy_bandwidth_GBps"] > 0
    assert result["startup_seconds"] == {"first call, cold cache": 1.25,
                                         "first call, warm cache": 0.0125}
    assert json.loads((out / "bench.json").read_text())["complete"] is True
    assert result["repeats"] == 2 and result["warmup"] == 1 and result["device"].startswith("CPU")

    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    markdown = (out / "bench.md").read_text()
    assert markdown == bench.format_markdown(result) + "\n"
    assert "| tiny | float32 | sru_cupy SRU |" in markdown
    assert "1.00 (1.00-1.00) |" in markdown
    assert "first call, cold cache: 1.25 s; first call, warm cache: 12.5 ms" in markdown
    # the CPU paths timed: the layers' GEMM route and the recurrence's build
    from sru_cupy import cpu_gemm, info
    assert result["cpu_gemm"] == cpu_gemm.describe() and result["cpu_kernels"] == info.cpu_path()
    assert f"CPU GEMM of the SRU layers: {cpu_gemm.describe()}. Recurrence: {info.cpu_path()}." \
        in markdown
    # the per-call section: the SRU against nn.LSTM at the tiny shape, and their host times
    per_call = result["per_call"]
    assert per_call["config"] == dict(bench.PER_CALL_CONFIG, dtype="float32")
    assert [r["model"] for r in per_call["rows"]] == ["sru_cupy SRU", "torch LSTM"]
    lstm = per_call["rows"][1]
    assert lstm["forward_ratio"] > 0 and per_call["forward_ratio_to_lstm"] == pytest.approx(
        1 / lstm["forward_ratio"])
    for model in ("sru_cupy SRU", "torch LSTM"):
        assert set(per_call["host_us"][model]) == {"forward", "forward_backward"}
        assert all(value > 0 for value in per_call["host_us"][model].values())
    assert per_call["host_us_forward"] == per_call["host_us"]["sru_cupy SRU"]["forward"]
    assert "goals" not in per_call  # the goals are for a GPU
    assert "Per-call cost at L=1 B=1 d=32, 1 layer, float32" in markdown
    sru_host = per_call["host_us"]["sru_cupy SRU"]
    assert (f"| sru_cupy SRU | {per_call['rows'][0]['forward_ms'] * 1e3:.1f} | 1.00 (1.00-1.00) |"
            in markdown)
    assert f"| {sru_host['forward']:.1f} | {sru_host['forward_backward']:.1f} |" in markdown
    assert any("Per-call cost" in line for line in printed)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name not in ("bench.json", "bench.md",
                                                                 "bench.png")]
    assert any("sru_cupy SRU" in line for line in printed) and markdown.strip() in printed


def test_markdown_shows_per_round_ratios_with_their_spread():
    result = {"device": "test device", "torch": "x", "threads": 2, "repeats": 20, "warmup": 5,
              "copy_bandwidth_GBps": 10.0, "skipped": {"c float32 sru package": "ImportError"},
              "layers": [
                  {"config": "c", "dtype": "float32", "model": "sru_cupy SRU",
                   "forward_ms": 2.0, "forward_backward_ms": 4.0,
                   "forward_ratio": 1.0, "forward_ratio_iqr": [1.0, 1.0],
                   "forward_backward_ratio": 1.0, "forward_backward_ratio_iqr": [1.0, 1.0]},
                  {"config": "c", "dtype": "float32", "model": "torch LSTM",
                   "forward_ms": 5.0, "forward_backward_ms": 6.0,
                   "forward_ratio": 2.4, "forward_ratio_iqr": [2.3, 2.55],
                   "forward_backward_ratio": 1.5, "forward_backward_ratio_iqr": [1.25, 1.75]},
                  {"config": "c", "dtype": "bfloat16", "model": "conv k=3",  # no SRU: no ratio
                   "forward_ms": 0.5, "forward_backward_ms": 4.5}],
              "recurrence": [{"config": "c", "dtype": "float32", "kernel": "backward", "ms": 2.0,
                              "floor_ms": 0.5, "percent_of_floor": 25.0,
                              "percent_of_floor_iqr": [24.0, 26.5],
                              "ns_per_element_per_core": 3.125}],
              "startup_seconds": {"import sru_cupy": 0.0015, "first call, cold cache": 4.5}}
    markdown = bench.format_markdown(result)
    # the ratio is the median of per-round ratios, not the ratio of the medians (2.5)
    assert "| c | float32 | torch LSTM | 5.000 | 2.40 (2.30-2.55) | 6.000 | 1.50 (1.25-1.75) |" \
        in markdown
    assert "| c | float32 | sru_cupy SRU | 2.000 | 1.00 (1.00-1.00) | 4.000 | 1.00 (1.00-1.00) |" \
        in markdown
    assert "| c | bfloat16 | conv k=3 | 0.500 | - | 4.500 | - |" in markdown
    assert "| c | float32 | backward | 2.0000 | 0.5000 | 25.0 (24.0-26.5) | 3.12 | - | - |" \
        in markdown
    assert "20 interleaved rounds" in markdown and "after 5 warm-up rounds" in markdown
    assert "import sru_cupy: 1.5 ms; first call, cold cache: 4.50 s" in markdown
    assert "Not measured: c float32 sru package (ImportError)" in markdown
    table = bench.format_layer_table(result["layers"])
    assert table.splitlines()[2].split()[-2:] == ["1.50", "(1.25-1.75)"]  # LSTM fwd+bwd ratio


def test_per_call_markdown_shows_the_goals_met_and_not_met():
    section = {"config": dict(bench.PER_CALL_CONFIG, dtype="float32"), "batch": 20,
               "host_timing": "20 calls back to back timed on the CPU side",
               "rows": [{"model": "sru_cupy SRU", "forward_ms": 0.0421, "forward_backward_ms": 0.125,
                         "forward_ratio": 1.0, "forward_ratio_iqr": [1.0, 1.0],
                         "forward_backward_ratio": 1.0, "forward_backward_ratio_iqr": [1.0, 1.0]},
                        {"model": "cuDNN LSTM", "forward_ms": 0.035, "forward_backward_ms": 0.1,
                         "forward_ratio": 0.8, "forward_ratio_iqr": [0.75, 0.85],
                         "forward_backward_ratio": 0.8, "forward_backward_ratio_iqr": [0.7, 0.9]}],
               "host_us": {"sru_cupy SRU": {"forward": 35.25, "forward_backward": 95.0},
                           "cuDNN LSTM": {"forward": 30.0, "forward_backward": 70.0}},
               "goals": [{"what": "forward time / nn.LSTM's", "value": 1.25, "goal": 1.5,
                          "met": True},
                         {"what": "host us per forward+backward", "value": 95.0, "goal": 80.0,
                          "met": False}]}
    text = bench.format_per_call(section)
    assert "| sru_cupy SRU | 42.1 | 1.00 (1.00-1.00) | 125.0 | 1.00 (1.00-1.00) | 35.2 | 95.0 |" \
        in text
    assert "| cuDNN LSTM | 35.0 | 0.80 (0.75-0.85) | 100.0 | 0.80 (0.70-0.90) | 30.0 | 70.0 |" in text
    assert ("forward time / nn.LSTM's 1.25 <= 1.5: met; host us per forward+backward 95.00 <= 80: "
            "NOT met") in text
    assert "20 calls back to back timed on the CPU side" in text


def test_host_time_per_call_is_the_median_of_batches_per_call(monkeypatch):
    clock = iter([0.0, 0.002, 1.0, 1.004, 2.0, 2.003])  # three batches: 2, 4 and 3 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []
    us = bench.host_time_per_call(lambda: calls.append(1), CPU, repeats=3, warmup=2, batch=10)
    assert len(calls) == 2 + 3 * 10
    assert us == pytest.approx(300.0)  # the median batch, 3 ms, over 10 calls


def test_rounds_interleave_the_callables_and_spread_gives_median_and_quartiles():
    order = []
    timer = bench.Timer(CPU, repeats=3, warmup=1)
    times = timer.rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")})
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed ones
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    assert bench.spread([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, [2.0, 4.0])
    assert bench.spread([7.0]) == (7.0, [7.0, 7.0])


def test_layer_ratios_are_taken_round_by_round(monkeypatch):
    """A load that doubles every time between rounds cancels out of the per-round ratios."""
    cfg = {"name": "tiny", "L": 2, "B": 1, "d": 4, "layers": 1, "bidirectional": False}
    monkeypatch.setattr(bench, "_models", lambda cfg, device, dtype: (
        {"sru_cupy SRU": lambda x: (x, None), "other": lambda x: (x * 2, None)}, {}))

    class DriftingTimer:
        repeats = 5

        def rounds(self, fns):
            assert list(fns) == [("sru_cupy SRU", "forward"), ("sru_cupy SRU", "forward_backward"),
                                 ("other", "forward"), ("other", "forward_backward")]
            load = [2.0 ** i for i in range(self.repeats)]
            base = {"sru_cupy SRU": 1.0, "other": 3.0}
            return {key: [base[key[0]] * f for f in load] for key in fns}

    rows, skipped = bench._layer_rows(cfg, CPU, torch.float32, DriftingTimer())
    other = next(r for r in rows if r["model"] == "other")
    assert not skipped and other["forward_ms"] == 12.0 and other["forward_ms_iqr"] == [6.0, 24.0]
    assert other["forward_ratio"] == 3.0 and other["forward_ratio_iqr"] == [3.0, 3.0]
    assert other["forward_backward_ratio"] == 3.0


def test_timer_runs_warmup_then_repeats_and_returns_the_median():
    calls = []
    timer = bench.Timer(CPU, repeats=5, warmup=2)
    median = timer(lambda: calls.append(1))
    assert len(calls) == 7
    assert 0 <= median < 100


def test_copy_bandwidth_counts_read_and_write():
    timer = bench.Timer(CPU, repeats=3, warmup=1)
    assert bench.copy_bandwidth(CPU, timer, nbytes=1 << 20) > 1e6  # over 1 MB/s on any machine


def test_startup_cost_measures_a_cold_then_warm_processes():
    result = bench.startup_cost(CPU, warm_runs=2)
    assert "error" not in result, result
    cold, warm = result["first call, cold cache"], result["first call, warm cache"]
    # the cold process compiles the kernels; the warm ones load them from the cache
    assert cold > warm > 0, result
    assert result["first call over the second, warm cache"] < warm, result
    # the imports come before the timed call and are reported apart (no CUDA context on the CPU)
    assert result["import torch"] > 0 and result["import sru_cupy"] > 0
    assert list(result)[:2] == ["import torch", "import sru_cupy"]
    assert "CUDA context" not in result


def test_startup_cost_reports_a_failing_process(monkeypatch):
    monkeypatch.setattr(bench, "_STARTUP_CHILD", "raise SystemExit('no kernels here')")
    assert bench.startup_cost(CPU, warm_runs=1) == {"error": ["no kernels here"]}


@pytest.mark.gpu
def test_gpu_kernel_timing_separates_kernel_and_launch_overhead():
    """On a GPU: the graph figure is per call and not above the eager one by more than noise, and
    the launch overhead is a host time per call. (The start-up cost's CUDA fields come from the
    benchmark stage of the GPU check.)"""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("gpu: this torch build has no CUDA device")
    from sru_cupy import ops
    device = torch.device("cuda")
    U = torch.randn(64, 8, 3 * 32, device=device)
    x = torch.randn(64, 8, 32, device=device)
    bias = torch.zeros(64, device=device)
    calls = []

    def fn():
        calls.append(1)
        return ops.recurrence_forward_op(U, x, None, bias, None, None, None, 32, False, True, False,
                                         1.0, False)
    row = bench.kernel_timing(fn, bench.Timer(device, repeats=3, warmup=2), launches=10)
    assert row["timing"] == "CUDA graph of 10 calls", row
    assert len(calls) == 2 + 3 * 10 + 10  # warm-up, eager batches, one capture
    assert 0 < row["ms"] <= row["eager_ms"] * 1.5 and row["launch_overhead_us"] > 0


def test_configs_named_are_run_even_when_gpu_only(tiny_configs):
    assert [c["name"] for c in bench.select_configs(CPU)] == ["tiny", "tiny-2layer-bi"]
    assert [c["name"] for c in bench.select_configs(CPU, include_all=True)] == [
        "tiny", "tiny-2layer-bi", "tiny-gpu"]
    assert [c["name"] for c in bench.select_configs(CPU, ["tiny-gpu"])] == ["tiny-gpu"]


def test_default_configs_hold_the_paper_sizes():
    by_name = {c["name"]: c for c in bench.CONFIGS}
    assert (by_name["L32-B32-d256"]["L"], by_name["L32-B32-d256"]["d"]) == (32, 256)
    assert (by_name["L128-B32-d512"]["L"], by_name["L128-B32-d512"]["d"]) == (128, 512)
    assert by_name["L256-B64-d1024"]["gpu_only"]
    assert by_name["L128-B32-d512-4layer-bi"]["layers"] == 4
    assert by_name["L128-B32-d512-4layer-bi"]["bidirectional"]


def test_default_configs_hold_the_srupp_sizes():
    by_name = {c["name"]: c for c in bench.CONFIGS if c.get("srupp")}
    assert sorted(c["L"] for c in by_name.values()) == [512, 2048]
    assert all(c["layers"] == 4 and not c["bidirectional"] for c in by_name.values())


def test_srupp_configs_time_srupp_transformer_and_sru(monkeypatch):
    monkeypatch.setattr(bench, "CONFIGS", [{"name": "tiny-srupp", "L": 6, "B": 2, "d": 16,
                                            "layers": 4, "bidirectional": False, "srupp": True}])
    monkeypatch.setattr(bench, "startup_cost", lambda device: {})
    result = bench.run("cpu", repeats=1, warmup=0, echo=lambda line: None)
    assert {r["model"] for r in result["layers"]} == {
        "sru_cupy SRU", "SRU++ (all)", "SRU++ (1 of 4)", "Transformer"}, result["skipped"]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in result["layers"])
    assert "| tiny-srupp | float32 | SRU++ (1 of 4) |" in bench.format_markdown(result)
    models = bench._srupp_models(bench.CONFIGS[0], CPU, torch.float32)
    attention = {name: [type(layer.transform_module).__name__ for layer in
                        models[name].module.rnn_lst] for name in ("SRU++ (all)", "SRU++ (1 of 4)")}
    assert attention == {"SRU++ (all)": ["SRUppAttention"] * 4,
                         "SRU++ (1 of 4)": ["SRUppProjectedLinear"] * 3 + ["SRUppAttention"]}
    encoder = models["Transformer"].module
    assert len(encoder.layers) == 4 and encoder.layers[0].self_attn.embed_dim == 16
    x = torch.randn(6, 2, 16)
    assert all(model(x)[0].shape == (6, 2, 16) for model in models.values())


@pytest.mark.parametrize("kwargs,match", [
    (dict(configs=["L32-B32-d256", "nope"]), r"configs: expected names among .*'L32-B32-d256'.*"
                                             r"got unknown \['nope'\]"),
    (dict(dtypes=["float8"]), r"dtypes: expected names among .*float32.*got \['float8'\]"),
    (dict(dtypes=[]), r"dtypes: expected names among"),
    (dict(device="tpu"), r"device: expected auto, cpu or cuda\[:N\], got 'tpu'"),
    (dict(device="meta"), r"device: expected auto, cpu or cuda\[:N\], got 'meta'"),
    (dict(repeats=0), r"repeats, warmup: expected >= 1 and >= 0, got 0, 5"),
    (dict(warmup=-1), r"repeats, warmup: expected >= 1 and >= 0, got 20, -1"),
], ids=["config", "dtype", "no-dtype", "device", "meta-device", "repeats", "warmup"])
def test_bad_arguments_are_rejected_before_timing(monkeypatch, kwargs, match):
    monkeypatch.setattr(bench, "Timer", None)  # would fail if anything were timed
    kwargs = dict({"device": "cpu"}, **kwargs)
    with pytest.raises(ValueError, match=match):
        bench.run(echo=lambda line: None, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="device: 'cuda' requested, but PyTorch sees no CUDA device"):
        bench.select_device("cuda")
    assert bench.select_device("auto") == CPU


def test_a_stopped_run_leaves_the_configurations_measured_so_far(tiny_configs, tmp_path,
                                                                   monkeypatch):
    """bench.json is written after every configuration, marked incomplete until the end."""
    out = tmp_path / "results"

    def stopped(device):
        seen = json.loads((out / "bench.json").read_text())
        assert seen["complete"] is False
        assert {r["config"] for r in seen["layers"]} == {"tiny", "tiny-2layer-bi"}
        assert seen["per_call"]["host_us"]["sru_cupy SRU"]["forward"] > 0
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "startup_cost", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.run("cpu", out_dir=str(out), repeats=1, warmup=0, echo=lambda *a: None)
    assert json.loads((out / "bench.json").read_text())["complete"] is False
    markdown = (out / "bench.md").read_text()
    assert "| tiny-2layer-bi | float32 | sru_cupy SRU |" in markdown
    assert "Per-call cost at L=1 B=1 d=32" in markdown and "(incomplete" in markdown


def test_every_section_is_written_as_soon_as_it_is_measured(tiny_configs, tmp_path, monkeypatch):
    """bench.json after the copy bandwidth, the per-call section, each configuration and the
    start-up costs, each time with what came before: a run stopped anywhere keeps them."""
    out = tmp_path / "results"
    seen = []
    write_partial = bench.write_partial

    def recording(result, out_dir):
        write_partial(result, out_dir)
        data = json.loads((out / "bench.json").read_text())
        seen.append((data["complete"], "copy_bandwidth_GBps" in data, "per_call" in data,
                     sorted({r["config"] for r in data["layers"]}), "startup_seconds" in data))
    monkeypatch.setattr(bench, "write_partial", recording)
    bench.run("cpu", out_dir=str(out), repeats=1, warmup=0, echo=lambda *a: None)
    assert seen == [(False, True, False, [], False),
                    (False, True, True, [], False),
                    (False, True, True, ["tiny"], False),
                    (False, True, True, ["tiny", "tiny-2layer-bi"], False),
                    (False, True, True, ["tiny", "tiny-2layer-bi"], True)]
    assert json.loads((out / "bench.json").read_text())["complete"] is True
    assert "(incomplete" not in (out / "bench.md").read_text()
