"""The cold-start instrument (`scripts/bench.py load-profile`, export/load_profile.py) on the tiny engines, CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_profile_breaks_a_cold_start_down(tiny_engines, tmp_path):
    shutil.copytree(tiny_engines, tmp_path / "engines")
    time.sleep(1.1)                     # older than verify.RACY_NS: the first start may remember the files
    out = tmp_path / "lp.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "load-profile", "--root", str(tmp_path),
                        "--backend", "onnxruntime-cpu", "--warmup", "256x256", "--scenarios",
                        "parallel-uncached,parallel-cached", "--out", str(out)],
                       capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    io, first, again = recs
    assert io["kind"] == "load-profile-io" and io["read_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "engines").rglob("*") if p.is_file())
    assert io["hash_file"] == "text_encoder.onnx.data" and io["hash_gb_per_s"] > 0

    from ideogram4_engine.runtime.manifest import load_manifest
    m = load_manifest(tmp_path / "engines")
    loaded = tuple(first["components"])
    assert {"text_encoder", "dit_cond", "dit_uncond", "vae_decoder"} <= set(loaded) and loaded == tuple(again["components"])
    needed = {Path(f).name for f in m.files_for_variant("cpu", loaded)}
    for rec, hashed in ((first, needed), (again, set())):       # the second process finds the digest cache
        assert rec["kind"] == "load-profile" and rec["graph_variant"] == "cpu"
        assert {e["name"] for e in rec["events"] if e["kind"] == "sha256"} == hashed
        assert rec["sha256_bytes"] == sum(m.root.joinpath(f).stat().st_size
                                          for f in m.files_for_variant("cpu", loaded) if Path(f).name in hashed)
        assert {e["name"] for e in rec["events"] if e["kind"] == "session"} == {
            m.graph_path(c, "cpu").name for c in loaded}
        for c, v in rec["components"].items():
            assert v["session_s"] > 0 and v["session_end_s"] <= rec["pipeline_s"] + 1e-6
            assert v["files_hashed"] == (len(m.files_for_variant("cpu", [c])) if hashed else 0)
        parts = rec["imports_s"] + rec["manifest_s"] + rec["tokenizer_s"] + rec["pipeline_s"] + \
            rec["warmup_first"]["total_s"]
        assert parts <= rec["ready_s"] <= rec["process_wall_s"]
        assert 0 <= rec["uncovered_s"] <= rec["pipeline_s"]
        assert rec["session_wall_s"] <= rec["session_total_s"] + 1e-6
        assert set(rec["warmup_first"]["per_component_s"]) == {"text_encoder", "dit_cond", "dit_uncond",
                                                                "guided_step", "vae_decoder"}
    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "report", "--root", str(tmp_path)],
                            capture_output=True, text=True, env=os.environ.copy())
    assert "load-profile parallel-cached: ready" in report.stdout and "sha256 0.0 s" in report.stdout
