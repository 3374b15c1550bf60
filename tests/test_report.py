"""`pipelines.report`: the summary `make run` prints and the tables the README and the Prefect
artifacts are made from."""
from __future__ import annotations

import json

from pipelines.report import EDIT_TABLE_METRICS, customize_multi_rows, edit_rows, main, markdown_table, summary

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


def test_summary_and_tables_of_instruct_pix2pix(tmp_path, capsys):
    scores = {"success": 0.5, "gt_psnr": 20.0, "clip_direction": 0.4, "clip_image": 0.7, "clip_text_output": 0.8}
    ev = {"n_cases": 7, "default_image_guidance": 1.5, "per_image_guidance": {"1.0": {**scores, "success": 0.1},
                                                                            "1.5": scores},
          "unchanged_input_baseline": {**scores, "success": 0.0}, "per_kind_at_default": {"time": scores}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "ip2p_eval.json").write_text(json.dumps(ev))
    text = summary(tmp_path)
    assert "InstructPix2Pix (7 held-out edits, image guidance 1.5): success 50" in text
    assert "input unchanged: 0" in text and "per_kind_at_default" not in text
    assert main(["--repo", str(tmp_path), "--ip2p-table"]) == 0
    scale_table, kind_table = capsys.readouterr().out.strip().split("\n\n")
    assert scale_table.splitlines()[0] == "| image_guidance | " + " | ".join(scores) + " |"
    assert [row.split(" | ")[0] for row in scale_table.splitlines()[2:]] == ["| 1.0", "| 1.5", "| input unchanged"]
    assert kind_table.splitlines()[2] == "| time | 0.5 | 20 | 0.4 | 0.7 | 0.8 |"


def test_summary_and_tables_of_instruct_pix2pix_in_two_languages(tmp_path, capsys):
    scores = {"success": 0.5, "gt_psnr": 20.0, "clip_direction": 0.4, "clip_image": 0.7, "clip_text_output": 0.8}
    conditions = {"ip2p_en": scores, "ip2p_multilingual_en": scores, "ip2p_multilingual_ru": {**scores, "success": 0.25}}
    ev = {"scores": conditions, "per_kind": {name: {"time": s, "add": s} for name, s in conditions.items()}}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "ip2p_multilingual_eval.json").write_text(json.dumps(ev))
    text = summary(tmp_path)
    assert "Russian instructions (models/ip2p_multilingual): success 25.0%, English on models/ip2p 50.0%" in text
    assert "per_kind" not in text and "--ip2p-language-table" in text
    assert main(["--repo", str(tmp_path), "--ip2p-language-table"]) == 0
    overall, kinds = capsys.readouterr().out.strip().split("\n\n")
    assert [row.split(" | ")[0] for row in overall.splitlines()[2:]] == ["| " + name for name in conditions]
    assert kinds.splitlines()[0] == "| edit | " + " | ".join(conditions) + " |"
    assert kinds.splitlines()[2:] == ["| add | 0.5 | 0.5 | 0.25 |", "| time | 0.5 | 0.5 | 0.25 |"]


def test_edit_runs_tables_and_summary(tmp_path, capsys):
    from pipelines.report import RUNS_COLUMNS

    overall = {"n": 2, **{k: 0.5 for k in RUNS_COLUMNS[1:]}, "recon_psnr": None}
    runs = {"complete": True, "n_cases": 2,
            "results": {m: {"overall": overall, "by_kind": {"object": {"n": 1, "success": 1.0},
                                                            "style": {"n": 1, "success": None}}}
                        for m in ("imagic", "instruct-pix2pix")},
            "reuse": {"imagic": {"n": 1, "first_seconds": 4.0, "second_seconds": 2.0, "speedup": 2.0}}}
    assert main(["--repo", str(tmp_path), "--edit-runs-table"]) == 1
    assert "dvc repro edit_runs" in capsys.readouterr().err
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "edit_runs.json").write_text(json.dumps(runs))
    assert main(["--repo", str(tmp_path), "--edit-runs-table"]) == 0
    tables = capsys.readouterr().out.strip().split("\n\n")
    assert len(tables) == 3
    assert tables[0].splitlines()[0] == "| method | " + " | ".join(RUNS_COLUMNS) + " |"
    assert tables[0].splitlines()[3].startswith("| instruct-pix2pix | 2 | 0.5 |") and "|  | 0.5 |" in tables[0]
    assert tables[1].splitlines()[2] == "| imagic | 1 |  |"
    assert tables[2].splitlines()[2] == "| imagic | 1 | 4 | 2 | 2 |"
    text = summary(tmp_path)
    assert [line.split()[1] for line in text.splitlines() if line.startswith("  editing ")] == [
        "imagic", "instruct-pix2pix"]
    assert "--edit-runs-table" in text


def test_customize_multi_table_keeps_the_ceilings_without_seconds():
    scores = {"both_present": 0.0, "both_in_place": 0.0, "first_present": 0.1, "second_present": 0.0, "clip_t": 0.8}
    metrics = {"multi_concept": {"lora/teapot+robot": {**scores, "first_alone": 0.2, "second_alone": 0.075,
                                                       "seconds": 95.4},
                                 "real/teapot+robot": scores}}
    table = markdown_table(customize_multi_rows(metrics)).splitlines()
    assert table[0] == ("| run | both_present | both_in_place | first_present | second_present | first_alone | "
                        "second_alone | clip_t | seconds |")
    assert table[2] == "| lora/teapot+robot | 0 | 0 | 0.1 | 0 | 0.2 | 0.075 | 0.8 | 95.4 |"
    assert table[3] == "| real/teapot+robot | 0 | 0 | 0.1 | 0 |  |  | 0.8 |  |"
