"""`python -m pipelines.report [--repo DIR]`: a short human summary of metrics/*.json and of where
the results are. `make run` calls it after `dvc repro`; the Prefect flow builds its artifacts
from the same helpers. No Prefect import, so it is instant."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL = Path("models/base")
GRID = Path("plots/base_grid.png")
CAPTIONS = Path("plots/base_grid_captions.txt")
METRICS_DIR = Path("metrics")
BASE_METRICS = METRICS_DIR / "base.json"
EDIT_METRICS = METRICS_DIR / "edit_benchmark.json"
EDIT_GRID = Path("plots/edit_grid.png")
CUSTOMIZE_METRICS = METRICS_DIR / "customize.json"
RUNS_METRICS = METRICS_DIR / "edit_runs.json"
IP2P_METRICS = METRICS_DIR / "ip2p_eval.json"
IP2P_LANGUAGE_METRICS = METRICS_DIR / "ip2p_multilingual_eval.json"
RUNS_GRIDS = Path("plots/edit_runs")
RUNS_COLUMNS = ("n", "success", "gt_psnr_in", "gt_psnr_out", "bg_psnr", "clip_t", "structure_dist", "recon_psnr",
                "prepare_seconds", "edit_seconds", "peak_memory_mb", "stored_bytes")
# The columns of the customization table (README, `make run` summary).
CUSTOMIZE_COLUMNS = ("subject_accuracy", "judge_feature_similarity", "clip_i", "clip_t", "scene_accuracy", "kid",
                     "seconds", "peak_memory_mb", "artifact_bytes")
# The columns of the edit benchmark's tables (README, Prefect artifact, `make run` summary).
EDIT_TABLE_METRICS = ("n", "recon_psnr", "recon_ssim", "bg_psnr", "bg_mse", "bg_ssim", "gt_psnr_in", "gt_psnr_out",
                      "clip_t", "clip_t_region", "structure_dist", "success", "invert_seconds", "edit_seconds")


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def load_metrics(repo: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((repo / METRICS_DIR).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            out[path.stem] = {"error": f"unreadable: {err}"}
    return out


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def base_headline(m: dict) -> str:
    """One sentence on the base model from metrics/base.json."""
    gen, real = m.get("generated", {}), m.get("real", {})
    clip_t, kid = m.get("clip_t", {}), m.get("kid", {}).get("judge_features", {})
    return (f"base model: generated images get every requested attribute right in {_pct(gen.get('all'))} of "
            f"samples (real renders: {_pct(real.get('all'))}); CLIP-T generated/real = {clip_t.get('ratio', 'n/a')}; "
            f"KID on judge features generated-vs-real {kid.get('generated_vs_real', 'n/a')} "
            f"(real-vs-real {kid.get('real_vs_real', 'n/a')}); "
            f"{m.get('seconds_per_image', 'n/a')} s/image at {m.get('steps', '?')} steps")


def edit_rows(metrics: dict) -> list[dict]:
    """One row per inversion x edit type ("all" first) from metrics/edit_benchmark.json."""
    rows = []
    for method, agg in metrics.get("inversions", {}).items():
        for kind, values in {"all": agg["overall"], **agg["by_kind"]}.items():
            rows.append({"inversion": method, "edit": kind,
                         **{k: "" if values.get(k) is None else values[k] for k in EDIT_TABLE_METRICS}})
    return rows


def runs_rows(metrics: dict) -> list[dict]:
    """One row per editing run (all edit types), from metrics/edit_runs.json."""
    return [{"method": label, **{k: "" if agg["overall"].get(k) is None else agg["overall"][k] for k in RUNS_COLUMNS}}
            for label, agg in metrics.get("results", {}).items()]


def runs_kind_rows(metrics: dict) -> list[dict]:
    """Edit success per run x edit type."""
    results = metrics.get("results", {})
    kinds = list(next(iter(results.values()))["by_kind"]) if results else []
    return [{"method": label, **{k: "" if agg["by_kind"][k].get("success") is None else agg["by_kind"][k]["success"]
                                 for k in kinds}} for label, agg in results.items()]


def runs_reuse_rows(metrics: dict) -> list[dict]:
    return [{"method": label, **values} for label, values in metrics.get("reuse", {}).items()]


def ip2p_rows(metrics: dict) -> list[dict]:
    """The trade-off over image-guidance scales, then the do-nothing baseline, from metrics/ip2p_eval.json."""
    rows = [{"image_guidance": scale, **values} for scale, values in metrics.get("per_image_guidance", {}).items()]
    if "unchanged_input_baseline" in metrics:
        rows.append({"image_guidance": "input unchanged", **metrics["unchanged_input_baseline"]})
    return rows


def ip2p_kind_rows(metrics: dict) -> list[dict]:
    return [{"edit": kind, **values} for kind, values in metrics.get("per_kind_at_default", {}).items()]


def ip2p_language_rows(metrics: dict) -> list[dict]:
    """Each (model, instruction language) condition, from metrics/ip2p_multilingual_eval.json."""
    return [{"condition": name, **values} for name, values in metrics.get("scores", {}).items()]


def ip2p_language_kind_rows(metrics: dict) -> list[dict]:
    """Edit success per kind, one column per condition."""
    per_kind = metrics.get("per_kind", {})
    kinds = sorted({kind for by_kind in per_kind.values() for kind in by_kind})
    return [{"edit": kind, **{name: by_kind.get(kind, {}).get("success", "") for name, by_kind in per_kind.items()}}
            for kind in kinds]


def customize_rows(metrics: dict) -> list[dict]:
    """One row per method (means over its concepts) and the `real` ceiling, from metrics/customize.json."""
    return [{"method": method, **{k: values.get(k, "") for k in CUSTOMIZE_COLUMNS}}
            for method, values in metrics.get("methods", {}).items()]


MULTI_COLUMNS = ("both_present", "both_in_place", "first_present", "second_present", "first_alone", "second_alone",
                 "clip_t", "seconds")


def customize_multi_rows(metrics: dict) -> list[dict]:
    """One row per multi-concept run, then the pair's ceilings (`real/...`, `base/...`), which
    train nothing and so have no seconds."""
    return [{"run": run, **{k: values.get(k, "") for k in MULTI_COLUMNS}}
            for run, values in metrics.get("multi_concept", {}).items()]


def customize_drift_rows(metrics: dict) -> list[dict]:
    return [{"run": run, **values} for run, values in metrics.get("drift", {}).items()
            if run.startswith("dreambooth")]


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def summary(repo: Path) -> str:
    repo = Path(repo)
    metrics = load_metrics(repo)
    lines = [f"Results in {repo.resolve()}"]
    if not metrics:
        lines.append("  no metrics/*.json yet: run `dvc repro` (or `make run`) first")
        return "\n".join(lines)
    if "base" in metrics:
        base = metrics["base"]
        lines.append("  " + base_headline(base))
        gen, real = base.get("generated", {}), base.get("real", {})
        if gen:
            lines.append("  attribute accuracy generated/real: "
                         + ", ".join(f"{k} {_fmt(v)}/{_fmt(real.get(k, 'n/a'))}" for k, v in gen.items()))
    if "edit_benchmark" in metrics:
        bench = metrics["edit_benchmark"]
        lines.append(f"  edit benchmark ({bench.get('n_cases', '?')} cases, complete: {bench.get('complete')}):")
        for method, agg in bench.get("inversions", {}).items():
            o = agg["overall"]
            lines.append(f"    {method:<16} reconstruction {_fmt(o.get('recon_psnr'))} dB, background "
                         f"{_fmt(o.get('bg_psnr'))} dB, success {_pct(o.get('success'))}, "
                         f"{_fmt(o.get('invert_seconds'))} + {_fmt(o.get('edit_seconds'))} s per case")
    if "edit_runs" in metrics:
        for row in runs_rows(metrics["edit_runs"]):
            lines.append(f"  editing {row['method']:<18} success {_pct(row['success'])}, background "
                         f"{_fmt(row['bg_psnr'])} dB, {_fmt(row['prepare_seconds'])} + {_fmt(row['edit_seconds'])} s "
                         f"per image")
    if "customize" in metrics:
        for row in customize_rows(metrics["customize"]):
            lines.append(f"  customization {row['method']:<22} subject {_pct(row['subject_accuracy'])}, CLIP-T "
                         f"{_fmt(row['clip_t'])}, scene {_pct(row['scene_accuracy'])}, KID {_fmt(row['kid'])}")
    if "ip2p_eval" in metrics:
        ev = metrics["ip2p_eval"]
        scale = ev.get("default_image_guidance")
        at = ev.get("per_image_guidance", {}).get(str(scale), {})
        still = ev.get("unchanged_input_baseline", {})
        lines.append(f"  InstructPix2Pix ({ev.get('n_cases', '?')} held-out edits, image guidance {scale}): success "
                     f"{_pct(at.get('success'))} (input unchanged: {_pct(still.get('success'))}), PSNR to truth "
                     f"{_fmt(at.get('gt_psnr'))} dB, directional CLIP {_fmt(at.get('clip_direction'))}, "
                     f"CLIP-I {_fmt(at.get('clip_image'))}; model: models/ip2p")
    if "ip2p_multilingual_eval" in metrics:
        scores = metrics["ip2p_multilingual_eval"].get("scores", {})
        ru, en = scores.get("ip2p_multilingual_ru", {}), scores.get("ip2p_en", {})
        lines.append(f"  InstructPix2Pix, Russian instructions (models/ip2p_multilingual): success "
                     f"{_pct(ru.get('success'))}, English on models/ip2p {_pct(en.get('success'))}")
    for name, m in metrics.items():
        if name == "ip2p_multilingual_eval":
            lines.append(f"  metrics/{name}.json: per condition and edit kind in `python -m pipelines.report "
                         "--ip2p-language-table`, grid in plots/ip2p_multilingual_grid.png")
            continue
        if name == "ip2p_eval":
            lines.append(f"  metrics/{name}.json: per image-guidance scale and edit kind; curve in plots/ip2p_tradeoff.csv")
            continue
        if name == "edit_benchmark":
            lines.append(f"  metrics/{name}.json: per edit type in `python -m pipelines.report --edit-table`")
            continue
        if name == "edit_runs":
            lines.append(f"  metrics/{name}.json: per method and edit type in `python -m pipelines.report "
                         "--edit-runs-table`, grids in plots/edit_runs/")
            continue
        if name == "customize":
            lines.append(f"  metrics/{name}.json: per run; tables in `python -m pipelines.report --customize-table`, "
                         "grids in plots/customize/")
            continue
        if name == "base":
            lines.append(f"  metrics/{name}.json: {len(flatten(m))} values (`dvc metrics show`)")
            continue
        flat = "  ".join(f"{k}={_fmt(v)}" for k, v in flatten(m).items())
        lines.append(f"  metrics/{name}.json: {flat}")

    def where(path: Path, what: str) -> str:
        return f"  {what:<8} {path}" + ("" if (repo / path).exists() else "  (missing)")

    lines += [
        where(MODEL, "model:") + f"  -> StableDiffusionPipeline.from_pretrained({str(MODEL)!r})",
        where(GRID, "samples:") + f"  (rows: real | VAE reconstruction | samples; captions in {CAPTIONS})",
        "  more:    `dvc metrics show`, `dvc plots show` (loss curves in plots/*.csv)",
    ]
    return "\n".join(lines)


# CLI flag -> (metrics file, the stage that writes it, the README tables made from it)
TABLES = {
    "edit_table": (EDIT_METRICS, "edit_benchmark", (edit_rows,)),
    "customize_table": (CUSTOMIZE_METRICS, "customize", (customize_rows, customize_multi_rows, customize_drift_rows)),
    "edit_runs_table": (RUNS_METRICS, "edit_runs", (runs_rows, runs_kind_rows, runs_reuse_rows)),
    "ip2p_table": (IP2P_METRICS, "ip2p_evaluate", (ip2p_rows, ip2p_kind_rows)),
    "ip2p_language_table": (IP2P_LANGUAGE_METRICS, "ip2p_evaluate_multilingual",
                            (ip2p_language_rows, ip2p_language_kind_rows)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."), help="project root (default: .)")
    ap.add_argument("--edit-table", action="store_true",
                    help="print the edit benchmark's inversion x edit type table as markdown (the README's)")
    ap.add_argument("--customize-table", action="store_true",
                    help="print the customization tables (methods, multi-concept, drift) as markdown (the README's)")
    ap.add_argument("--edit-runs-table", action="store_true",
                    help="print the single-image methods' tables (overall, success per edit type, reuse) as markdown")
    ap.add_argument("--ip2p-table", action="store_true",
                    help="print the InstructPix2Pix tables (per image-guidance scale, per edit kind) as markdown")
    ap.add_argument("--ip2p-language-table", action="store_true",
                    help="print InstructPix2Pix on English and Russian instructions (overall, success per edit kind)")
    args = ap.parse_args(argv)
    for flag, (metrics, stage, tables) in TABLES.items():
        if getattr(args, flag):
            path = args.repo / metrics
            if not path.is_file():
                print(f"{path} is missing: run `dvc repro {stage}`", file=sys.stderr)
                return 1
            m = json.loads(path.read_text())
            print("\n\n".join(markdown_table(table(m)) for table in tables))
            return 0
    print(summary(args.repo))
    return 0 if load_metrics(args.repo) else 1


if __name__ == "__main__":
    sys.exit(main())
