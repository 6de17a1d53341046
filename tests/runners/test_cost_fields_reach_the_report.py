"""The runner's new cost figures and device record reach analysis' frame, and costs stay per device type."""
import pytest

from analysis.aggregate import normalise_to_lora, per_run
from analysis.load import COST_COLUMNS, _frame, record_to_rows

GIB = 2**30


def _record(method: str, device: str, gpu: dict | None, cost: dict, seed: int = 0) -> dict:
    run = {"id": f"{method}-{device}-{seed}", "method": method, "task": "clip", "size": "base", "seed": seed,
           "budget_target": 1000, "hp": {"r": 4}, "config": {}, "device": device, "gpu": gpu,
           "status": "success", "error": None}
    return {"schema": 1, "run": run, "params": {"trainable": 1000, "total": 10_000}, "cost": cost,
            "metrics": {"accuracy": 0.5, "accuracy_before": 0.4, "per_dataset": {"cars": 0.5}}}


def _gpu_cost(step: float, growth: int) -> dict:
    return {"step_time_s": step, "peak_mem_growth_bytes": growth, "peak_mem_bytes": 20 * GIB + growth,
            "peak_reserved_bytes": 24 * GIB, "activation_bytes": growth // 2, "state_bytes": 16_000}


def _frame_of(records: list[dict]):
    return _frame([row for i, r in enumerate(records) for row in record_to_rows(r, f"run{i}")], [])


def test_every_cost_figure_and_the_device_type_are_columns():
    h100 = {"name": "NVIDIA H100 80GB HBM3", "count": 1}
    cpu = _record("lora", "cpu:x86_64 x2 threads=1", None,
                  {"step_time_s": 0.1, "peak_rss_bytes": 5 * 2**20, "activation_bytes": 123,
                   "state_bytes": 456})
    df = _frame_of([_record("lora", "cuda:NVIDIA H100 80GB HBM3", h100, _gpu_cost(0.01, GIB)), cpu])
    assert ({"peak_mem_growth_bytes", "peak_reserved_bytes", "activation_bytes", "state_bytes"}
            <= set(COST_COLUMNS))
    assert set(COST_COLUMNS) <= set(df.columns)
    gpu_row, cpu_row = df.iloc[0], df.iloc[1]
    assert gpu_row.peak_mem_growth_bytes == GIB and gpu_row.peak_reserved_bytes == 24 * GIB
    assert cpu_row.activation_bytes == 123 and cpu_row.state_bytes == 456
    assert list(df.device_type) == ["NVIDIA H100 80GB HBM3", "cpu"]


def test_older_files_get_the_device_type_from_the_device_string():
    record = _record("lora", "cuda:NVIDIA A100-SXM4-40GB", None, _gpu_cost(0.01, GIB))
    del record["run"]["gpu"]
    assert record_to_rows(record)[0]["device_type"] == "NVIDIA A100-SXM4-40GB"


def test_cost_ratios_to_lora_never_divide_across_device_types():
    """LoRA ran on both GPU models, RandLoRA on the H100 only: its ratio uses the H100 LoRA alone."""
    h100, a100 = {"name": "H100", "count": 1}, {"name": "A100", "count": 1}
    df = _frame_of([_record("lora", "cuda:H100", h100, _gpu_cost(0.010, GIB)),
                    _record("lora", "cuda:A100", a100, _gpu_cost(0.030, GIB)),
                    _record("randlora", "cuda:H100", h100, _gpu_cost(0.015, GIB))])
    rel = normalise_to_lora(per_run(df), ["step_time_s"]).set_index(["method", "device_type"])
    assert rel.loc[("randlora", "H100"), "step_time_s_rel"] == pytest.approx(1.5)
    assert rel.loc[("lora", "A100"), "step_time_s_rel"] == pytest.approx(1.0)


def test_flops_and_operators_per_step_reach_the_summary_table_relative_to_lora():
    """The device-independent figures stand beside step time, each as its ratio to LoRA at the budget."""
    from analysis.report import _summary_table

    def cost(step: float, flops: int, ops: int) -> dict:
        return {"step_time_s": step, "peak_rss_bytes": 2**20, "flops_per_step": flops, "ops_per_step": ops}

    df = _frame_of([_record("lora", "cpu", None, cost(0.10, 2_000_000, 400)),
                    _record("loha", "cpu", None, cost(0.12, 3_000_000, 600)),
                    _record("randlora", "cpu", None, cost(0.15, 5_000_000, 500))])
    table = _summary_table(df).table
    col = {h: i for i, h in enumerate(table.headers)}
    assert col["step time ×LoRA"] < col["FLOPs ×LoRA"] < col["ops ×LoRA"]
    rows = {r[0].text: r for r in table.rows}
    assert [rows["LoHa"][col[h]].text for h in ("FLOPs ×LoRA", "ops ×LoRA")] == ["1.50", "1.50"]
    assert [rows["RandLoRA"][col[h]].text for h in ("FLOPs ×LoRA", "ops ×LoRA")] == ["2.50", "1.25"]
    assert "operators dispatched" in table.caption


def test_runs_without_counts_show_no_count_columns():
    from analysis.report import _summary_table

    df = _frame_of([_record("lora", "cpu", None, {"step_time_s": 0.1, "peak_rss_bytes": 2**20})])
    assert not {"FLOPs ×LoRA", "ops ×LoRA"} & set(_summary_table(df).table.headers)
