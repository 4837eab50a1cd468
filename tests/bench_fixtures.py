"""The benchmark scripts with tiny-preset arguments, expected exit code, output text and JSON file."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


SCRIPTS = {
    "check_flat_adamw.py": (["--device", "cpu", "--elements", "100000"], 0, "flat fused kernel", None),
    "check_wgrad_fusion.py": (["--device", "cpu", "--shape", "257", "64", "96"], 0, "fp32: relative error", None),
    "loader.py": (["--seq-len", "8192", "--packs", "1", "--workers", "0", "--no-tp", "--video-seconds", "3",
                   "--json", "loader.json"], 0, "| videos | 0 |", "loader.json"),
    "packing.py": (["--samples", "3000", "--seq-lens", "32768", "--dps", "8", "--out", "packing.json"], 0,
                   "| 32K | 1 | 8 | balanced |", "packing.json"),
    "plan_data.py": (["--records", "300", "--workers", "1"], 0, "table_from_prepared, 1 worker(s)", None),
    "video_decode.py": (["--lengths", "2", "--codecs", "h264", "--frames", "4", "--repeat", "1", "--size", "64", "48",
                         "--tile", "32", "--json", "vd.json"], 0, "| h264 | 2 s |", "vd.json"),
    "scale_projection.py": (["--preset", "tiny", "--seq-lens", "512", "--packs-per-planner", "3", "--mix-samples",
                             "2000", "--project-samples", "3000", "--out", "sp.json", "--png", "sp.png"], 0,
                            "| 0K | 64 | ours | balanced |", "sp.json"),
    "attention_kernels.py": (["--totals", "1024", "--reps", "1"], 1, "no CUDA device", None),
    "layer_kernels.py": (["--reps", "1"], 2, "needs a GPU", None),
}
