"""`pipelines.report`: the summary `make run` prints and the tables the README and the Prefect
artifacts are made from."""
from __future__ import annotations

import json

from pipelines.report import EDIT_TABLE_METRICS, edit_rows, main, markdown_table, summary

METRICS = {
    "n_cases": 2, "complete": True,
    "inversions": {
        m: {"overall": {"n": 2, **{k: 1.5 for k in EDIT_TABLE_METRICS[1:]}, "bg_psnr": None},
            "by_kind": {"object": {"n": 1, **{k: 2.0 for k in EDIT_TABLE_METRICS[1:]}},
                        "style": {"n": 1, **{k: 1.0 for k in EDIT_TABLE_METRICS[1:]}}}}
        for m in ("ddim", "null-text")
    },
}


def test_edit_rows_one_per_inversion_and_kind_overall_first():
    rows = edit_rows(METRICS)
    assert [(r["inversion"], r["edit"]) for r in rows] == [
        ("ddim", "all"), ("ddim", "object"), ("ddim", "style"),
        ("null-text", "all"), ("null-text", "object"), ("null-text", "style")]
    assert list(rows[0]) == ["inversion", "edit", *EDIT_TABLE_METRICS]
    assert rows[0]["bg_psnr"] == "" and rows[1]["recon_psnr"] == 2.0  # undefined means stay blank


def test_markdown_table_and_cli(tmp_path, capsys):
    table = markdown_table(edit_rows(METRICS)).splitlines()
    assert table[0].startswith("| inversion | edit | n | recon_psnr")
    assert table[1] == "|" + "---|" * (2 + len(EDIT_TABLE_METRICS)) and len(table) == 8
    assert main(["--repo", str(tmp_path), "--edit-table"]) == 1
    assert "dvc repro edit_benchmark" in capsys.readouterr().err
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "edit_benchmark.json").write_text(json.dumps(METRICS))
    assert main(["--repo", str(tmp_path), "--edit-table"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == table


def test_summary_without_metrics_says_what_to_run(tmp_path):
    assert "run `dvc repro`" in summary(tmp_path)


def test_summary_gives_one_line_per_inversion(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "edit_benchmark.json").write_text(json.dumps(METRICS))
    text = summary(tmp_path)
    assert "edit benchmark (2 cases, complete: True):" in text
    assert [line.split()[0] for line in text.splitlines() if "dB, background" in line] == ["ddim", "null-text"]
    assert "--edit-table" in text and "inversions.ddim" not in text
