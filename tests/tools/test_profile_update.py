"""tools/profile_update.py: the packed update's wall time split by region adds up for each
core attention path, the profiled operator time is split into forward and backward
families, and the core attention is timed alone; the update's FLOP rate comes with a plain
matmul's from the same thread."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_profile_rollout import SMALL

ROOT = Path(__file__).resolve().parents[2]


def test_profile_update_splits_the_update_per_attention_path(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "tools/profile_update.py", "--size", "config",
                           "--steps", "1", "--out", str(out), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["paths"]) == {"mask", "split"} and res["matmul_flop_per_s"] > 0
    for path in res["paths"].values():
        r = path["regions_s"]
        parts = ("forward", "loss", "backward", "finalize", "optimizer", "rest")
        assert abs(sum(r[k] for k in parts) - path["update_cpu_s"]["median"]) < 1e-9
        assert r["rest"] >= 0
        assert 0 < r["forward/core_attention"] < r["forward"] and r["backward"] > 0
        ops = path["profiled"]["op_self_s"]
        assert ops["forward"]["gemm"] > 0 and ops["backward"]["gemm"] > 0
        alone = path["attention_alone"]
        assert alone["forward_s"] > 0 and alone["backward_s"] > 0 and alone["layers"] == 2
        assert path["update_flop"] > 0 and path["update_flop_per_s"] > 0
    assert res["rows"] == 4 * 2
