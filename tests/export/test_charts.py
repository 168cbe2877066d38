"""The benchmark chart is drawn from the records: one bar per path in each panel, its length proportional."""
import xml.dom.minidom

from ideogram4_engine.export.charts import BAR_W, chart_rows, svg_chart


def test_chart_has_one_bar_per_path_and_panel_scaled_to_the_largest():
    recs = [{"kind": "prepare"},
            {"kind": "reference-eager", "width": 64, "height": 64, "preset": "P", "step_ms": 400.0, "image_s": 8.0,
             "peak_gpu_bytes": 2 * 2**30},
            {"kind": "runtime", "width": 64, "height": 64, "preset": "P", "step_ms": 100.0, "image_s": 2.0,
             "gpu_mem_used_mib": 4096}]
    rows = chart_rows(recs)
    assert [r["memory_gib"] for r in rows] == [2.0, 4.0]
    doc = xml.dom.minidom.parseString(svg_chart(rows, "t & <x>"))
    widths = [float(r.getAttribute("width")) for r in doc.getElementsByTagName("rect")[1:]]
    assert widths == [BAR_W, BAR_W / 4, BAR_W, BAR_W / 4, BAR_W / 2, BAR_W]
