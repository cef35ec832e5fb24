"""The Markdown tables of docs/performance.md from a ``grad2 bench --json`` file.

Run: ``.venv/bin/python scripts/bench_markdown.py runs/bench.json`` (prints to stdout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grad2.lab.bench import JVP_VARIANTS


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    value = seconds * 1e3
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def find(records: list[dict], **keys) -> dict:
    return next(r for r in records if all(r.get(k) == v for k, v in keys.items()))


def per_batch(result: dict) -> list[str]:
    batches = sorted({r["batch"] for r in result["per_batch"]})
    lines = ["| item | " + " | ".join(f"B={b}" for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]
    names: list[tuple[str, str | None]] = []
    for record in result["per_batch"]:
        if (record["name"], record["surrogate"]) not in names:
            names.append((record["name"], record["surrogate"]))
    for name, size in names:
        label = name.replace("victim+", "+ ").replace("grad2_", "GRAD² ").replace("_", " ")
        label = label.replace("GRAD² jvp top1", "GRAD² jvp, preserve_top1")
        label = label.replace("mad argmax", "MAD-argmax").replace("mad closed form",
                                                                   "MAD in closed form")
        label = label.replace("mad", "MAD").replace("victim", "victim alone")
        label += f" [{size}]" if size else ""
        cells = []
        for batch in batches:
            r = find(result["per_batch"], name=name, batch=batch, surrogate=size)
            cells.append(ms(r["median_s"]) + ("" if name == "victim"
                                              else f" ({r['ratio_to_victim']:.1f}×)"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def scores(result: dict) -> list[str]:
    batches = sorted({r["batch"] for r in result["scores"]})
    lines = ["| surrogate | " + " | ".join(f"B={b}" for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]
    for size in ("same", "half"):
        rows = {"": [], **{label: [] for label, _ in JVP_VARIANTS.values()}}
        for batch in batches:
            r = find(result["scores"], batch=batch, surrogate=size)
            rows[""].append(f"{ms(r['jvp_s'])} / {ms(r['forward_s'])} ms ({r['ratio']:.2f}×)")
            for variant, (label, _) in JVP_VARIANTS.items():
                timing = r["variants"][variant]
                rows[label].append(f"{ms(timing['median_s'])} ms ({timing['ratio']:.2f}×)")
        for label, cells in rows.items():
            name = f"{size} size" + (f", {label}" if label else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def classes(result: dict) -> list[str]:
    lines = ["| K | victim | GRAD² (jvp) | MAD (library, vmap) | MAD / GRAD² | MAD one query at a "
             "time | ratio | MAD in closed form | closed form / GRAD² |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["classes"]:
        mad = ms(c.get("mad_per_query_s")) if "mad_s" in c else "not run: memory"
        ratio = f"{c['mad_over_grad2']:.1f}×" if "mad_over_grad2" in c else "—"
        loop = f"{c['mad_loop_over_grad2']:,.1f}×" if "mad_loop_over_grad2" in c else "—"
        lines.append(
            f"| {c['classes']} | {ms(c['victim_s'] / c['batch'])} | "
            f"{ms(c['grad2_per_query_s'])} | {mad} | {ratio} | "
            f"{ms(c.get('mad_loop_per_query_s'))} | {loop} | "
            f"{ms(c['mad_closed_form_per_query_s'])} | {c['mad_closed_form_over_grad2']:.2f}× |")
    return lines


def reference(result: dict) -> list[str]:
    lines = ["| K | reference style | vectorised | speed-up | max answer difference |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["reference"]:
        lines.append(f"| {r['classes']} | {ms(r['reference_s'])} ms | {ms(r['vectorised_s'])} ms"
                     f" | {r['speedup']:.1f}× | {r['max_abs_difference']:.1e} |")
    return lines


def compiled(result: dict) -> list[str]:
    lines = ["| batch | first call (compile) | eager | compiled | eager / forward | compiled / "
             "forward | max \\|compiled − eager\\| | row bits as in the largest batch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result.get("compile") or []:
        batch = "1 (as 2)" if c["batch"] == 1 else str(c["batch"])
        lines.append(f"| {batch} | {c['first_call_s']:.1f} s | {ms(c['eager_s'])} ms | "
                     f"{ms(c['compiled_s'])} ms | {c['eager_over_forward']:.2f}× | "
                     f"{c['compiled_over_forward']:.2f}× | {c['max_abs_difference']:.1e} | "
                     f"{'yes' if c['first_row_bit_identical_to_largest_batch'] else 'no'} |")
    return lines


def goals(result: dict) -> list[str]:
    lines = ["| goal | target | measured | verdict |", "| --- | --- | --- | --- |"]
    for g in result["goals"]:
        value = "—" if g["value"] is None else f"{g['value']:.2f}"
        verdict = {True: "met", False: "**not met**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['detail']} | {g['comparison'].replace('<=', '≤').replace('>=', '≥')} "
                     f"{g['threshold']:g} | {value} | {verdict} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path)
    result = json.loads(parser.parse_args().json.read_text())
    meta = result["meta"]
    print(f"<!-- {meta['command']} — {meta['date']}, load average {meta['load_average_start']}"
          f" → {meta['load_average_end']}, {meta['wall_s']:.0f} s -->")
    solver = result["solver"]
    sections = {
        "Victim + defense, per batch (median ms; × = ratio to the victim alone)": per_batch,
        "JVP scores against one plain forward of the same surrogate": scores,
        "Scaling with the number of classes (batch 32; per-query ms)": classes,
        "Reference-style GRAD² against the vectorised one (batch 32)": reference,
        "torch.compile on the JVP": compiled,
        "Goals": goals,
    }
    for title, table in sections.items():
        print(f"\n### {title}\n")
        print("\n".join(table(result)))
    shape = "×".join(str(v) for v in solver["resnet18_input"])
    print(f"\nSolver alone, {solver['rows']:,} × {solver['classes']:,}: "
          f"{ms(solver['solver_s'])} ms; one ResNet-18 forward of {shape}: "
          f"{ms(solver['resnet18_s'])} ms "
          f"({solver['solver_over_resnet18']:.2f}× the forward).")


if __name__ == "__main__":
    main()
