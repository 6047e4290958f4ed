"""Per-stage peak memory (report.json["memory"]["stages"]): memory.stage / StageMemory."""

from __future__ import annotations

import resource

from slim_lightning.memory import StageMemory, peak_memory, stage


def _touch(mib: int) -> bytearray:
    buf = bytearray(mib * 2**20)
    for i in range(0, len(buf), 4096):  # resident, not just reserved
        buf[i] = 1
    return buf


def test_stage_peaks_are_each_stages_own_and_nest(monkeypatch):
    mem = StageMemory()
    monkeypatch.setattr("slim_lightning.memory.MEMORY", mem)
    timings: dict[str, float] = {}
    with stage(timings, "big"):
        buf = _touch(300)
        del buf
    with stage(timings, "outer"):
        with stage(timings, "inner"):
            buf = _touch(120)
            del buf
        small = _touch(10)
    del small
    assert set(timings) == {"big_s", "outer_s", "inner_s"} and all(v >= 0 for v in timings.values())
    big, inner, outer = (mem.stages[k]["host_peak_gib"] for k in ("big", "inner", "outer"))
    assert big - inner > 0.1  # 300 MiB vs 120 MiB above the same baseline
    assert outer >= inner  # the nested stage's peak counts in the enclosing one
    # the process watermark is never reset: ru_maxrss (and /usr/bin/time) stay exact
    # (statm and VmHWM may differ by a few pages)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 >= 0.99 * big
    assert peak_memory()["peak_rss_gib"] >= 0.99 * big


def test_compress_report_has_stage_memory(compose_cfg, tmp_path):
    from slim_lightning.app.compress_run import run_compress

    report = run_compress(compose_cfg("compress", ["debug=default", "eval_dense=false"]), tmp_path)
    stages = report["memory"]["stages"]
    assert {"preflight", "load_base", "compress_setup", "eval", "export"} <= set(stages)
    for name, v in stages.items():
        assert 0 < v["host_peak_gib"] <= report["memory"]["peak_rss_gib"] + 1e-9, name
        assert report["timings"][f"{name}_s"] >= 0
