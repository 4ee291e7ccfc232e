"""The newest figures per machine: a PNG of img/s by stage and setting, and the table in bench/README.md.

    python bench/summarize.py [--results bench/results] [--readme bench/README.md]

Reads every bench/results/*.json, keeps the newest run of each benchmark on each machine (host, CPU model,
core count and GPU), and for each machine writes bench/results/summary-<host>.png (left: img/s of every
stage and setting on a log scale; right: the scaling curve) and a table between the two figures markers
in bench/README.md, each row naming the result file and the command that made it. Nothing is measured
here: every figure is read from a result file.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
SYNTAX_NAMES = {
    "1.2.840.10008.1.2.1": "uncompressed",
    "1.2.840.10008.1.2.5": "RLE",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 lossy",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
}


@dataclass
class Figure:
    stage: str
    setting: str
    img_per_s: float
    note: str = ""


def machine_key(record: dict) -> tuple:
    m = record["machine"]
    return m["host"], m["cpu"], m["affinity"], m.get("gpu")


def machine_label(key: tuple, machines) -> str:
    """The host name, or, where two machines share it (every sandbox VM is 'vm'), the host and the CPU."""
    host, cpu, cores, _ = key
    if sum(other[0] == host for other in machines) == 1:
        return host
    return f"{host}-{re.sub(r'[^a-z0-9]+', '-', cpu.lower()).strip('-')[:32]}-{cores}c"


def newest_runs(results: Path) -> dict[tuple, dict[str, tuple[Path, dict]]]:
    """{machine: {benchmark: (file, record)}}, the newest record of each benchmark on each machine."""
    runs: dict[tuple, dict[str, tuple[Path, dict]]] = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if "benchmark" not in record or "machine" not in record:
            continue
        mine = runs.setdefault(machine_key(record), {})
        if record["benchmark"] not in mine or mine[record["benchmark"]][1]["date"] < record["date"]:
            mine[record["benchmark"]] = (path, record)
    return runs


def _per_s(ms: float) -> float:
    return round(1000.0 / ms, 2) if ms else 0.0


def decode_figures(r: dict) -> list[Figure]:
    out = []
    for name, res in r["results"].items():
        label = "synthetic full-size" if name.startswith("synthetic") else "real files"
        for ts, s in res["by_transfer_syntax"].items():
            syntax = SYNTAX_NAMES.get(ts, ts)
            note = f"x{s['throughput_speedup']} throughput, x{s['median_decode_speedup']} median per file"
            full, reduced = _per_s(s["median_full_decode_ms"]), _per_s(s["median_reduced_decode_ms"])
            out.append(Figure("decode (1 core)", f"{syntax}, {label}, full resolution", full))
            out.append(
                Figure(
                    "decode (1 core)",
                    f"{syntax}, {label}, reduced",
                    reduced,
                    f"{note}; levels {s['levels']}; n={s['files']}",
                )
            )
        for key, s in res.get("by_size_and_syntax", {}).items():  # JPEG 2000 per detector size
            shape, ts = key.split(" ", 1)
            if "JPEG 2000" in SYNTAX_NAMES.get(ts, ""):
                out.append(
                    Figure(
                        "decode (1 core)",
                        f"{SYNTAX_NAMES[ts]} {shape}, {label}, reduced",
                        _per_s(s["median_reduced_decode_ms"]),
                        f"x{s['throughput_speedup']} throughput; levels {s['levels']}; n={s['files']}",
                    )
                )
    return out


def model_figures(r: dict) -> list[Figure]:
    out = []
    for row in r["results"]:
        setting = f"{row['setting']}, batch {row['batch']}"
        if "error" in row:  # a setting tried and refused (an option this build lacks): shown, at 0
            out.append(
                Figure(
                    f"model ({r['settings']['arch']} S={r['settings']['size']})",
                    setting,
                    0.0,
                    f"failed: {row['error']}",
                )
            )
            continue
        if "processes" in row:
            setting += f", {row['processes']} processes x {row['threads']} threads"
        else:
            setting += f", {row['threads']} threads"
        note = f"{row['tflops']} TFLOP/s"
        if "share_of_fp16_peak" in row:
            note += f", {row['share_of_fp16_peak']:.1%} of fp16 peak"
        out.append(
            Figure(f"model ({r['settings']['arch']} S={r['settings']['size']})", setting, row["img_per_s"], note)
        )
    return out


def pipeline_figures(r: dict) -> list[Figure]:
    res, s = r["results"], r["settings"]
    d = res["dens_infer"]
    stage = f"end to end ({s['arch']} S={s['size']}, {s['images']} files)"
    note = f"x{res['speedup']} the naive reference" if "speedup" in res else ""
    if "speedup_in_process" in res:
        note += f" (x{res['speedup_in_process']} leaving out start-up, as the naive figure does)"
    out = [
        Figure(
            stage,
            f"dens-infer, {d['workers']} workers, {d['threads']} threads, batch {d['batch_size']}",
            d["img_per_s"],
            note,
        )
    ]
    if "naive" in res:
        naive = res["naive"]["img_per_s"]
        out.append(Figure(stage, "naive reference", naive, "one process, pydicom full decode, torch eager, batch 1"))
    if res.get("model_stage", {}).get("share"):
        m = res["model_stage"]
        out.append(
            Figure(
                stage,
                "model stage inside dens-infer",
                m["in_pipeline_img_per_s"],
                f"{m['share']:.0%} of ORT alone ({m['alone_img_per_s']} img/s)",
            )
        )
    return out


def scaling_figures(r: dict) -> list[Figure]:
    return [
        Figure(
            "scaling (end to end)",
            f"{p['workers']} decode workers",
            p["img_per_s"],
            f"{p['bound']}-bound; decode alone {p['decode_pool_img_per_s']} img/s",
        )
        for p in r["points"]
    ]


def train_figures(r: dict) -> list[Figure]:
    return [
        Figure(
            f"training step ({r['device']})",
            f"{x['arch']} S={x['size']} batch {x['batch']} {x['precision']}"
            + (" channels_last" if x.get("channels_last") else ""),
            x["img_s"],
            f"peak {x['peak_memory_gib']} GiB" if x.get("peak_memory_gib") else "",
        )
        for x in r["results"]
    ]


def gradcam_figures(r: dict) -> list[Figure]:
    return [
        Figure(
            f"Grad-CAM ({r['device']})",
            f"{x['arch']} S={x['size']} batch {x['batch']}",
            _per_s(x["gradcam_ms_per_image"]),
            f"x{x['gradcam_over_forward']} a forward pass",
        )
        for x in r["results"]
    ]


def gpu_decode_figures(r: dict) -> list[Figure]:
    res = r["results"]
    gpu, pool = res["gpu"], res["cpu_pool"]
    stage = f"decode JPEG 2000 on GPU vs CPU ({r['settings']['files']} files, S={r['settings']['size']})"
    check = res["pixels"]
    pixels = (
        f"pixels against pydicom over {check['files']} files: max difference {check['max_abs_difference']}, "
        f"{check['size_mismatches']} of another size"
    )
    ratio = res["gpu_over_cpu_pool"]
    return [
        Figure(stage, "GPU nvImageCodec, full frame, one at a time", gpu["one_at_a_time_img_per_s"], pixels),
        Figure(stage, f"GPU nvImageCodec, full frame, batch {gpu['batch']}", gpu["batched_img_per_s"]),
        Figure(stage, "CPU dens route, reduced, one process", res["cpu_one_process"]["img_per_s"]),
        Figure(
            stage,
            f"CPU decode pool, reduced, {pool['workers']} workers",
            pool["img_per_s_after_first"] or 0,
            f"the best GPU figure is x{ratio} this" if ratio else "",
        ),
    ]


def int8_figures(r: dict) -> list[Figure]:
    s, res = r["settings"], r["results"]
    flags = ", ".join(res["cpu_flags"]) or "none"
    stage = f"int8 vs fp32 model ({s['arch']} S={s['size']}, CPU int8 instructions: {flags})"
    out = [
        Figure(
            stage,
            f"{row['graph']}, batch {row['batch']}, {row['threads']} threads",
            row["img_per_s"],
            f"x{row['speedup']} fp32" if "speedup" in row else "",
        )
        for row in res["model_stage"]
    ]
    e2e = res["end_to_end"]
    end = f"int8 vs fp32 end to end ({s['arch']} S={s['size']}, {e2e['images']} files)"
    out.append(Figure(end, "dens-infer, fp32", e2e["fp32"]["img_per_s"]))
    note = f"x{e2e['speedup']} fp32"
    agreement = res.get("agreement", {}).get("u8s8")  # the format dens-export writes by default
    if agreement:
        sets = [("held_out", "held-out"), ("unseen_synthetic", "unseen synthetic"), ("real", "real")]
        note += "; dense-call agreement with fp32 (demo resnet18 S=128, u8s8): " + ", ".join(
            f"{label} {agreement[key]['dense_agreement']:.1%} of {agreement[key]['images']}"
            for key, label in sets
            if agreement.get(key, {}).get("images")
        )
    out.append(Figure(end, "dens-infer, int8", e2e["int8"]["img_per_s"], note))
    return out


def ray_figures(r: dict) -> list[Figure]:
    s, res = r["settings"], r["results"]
    stage = f"dens-infer --engine ray vs local ({s['model']}, {s['cohort_files']} files, start-up included)"
    best = res["best_seconds"]
    files = s["cohort_files"]
    out = [
        Figure(stage, "local engine", round(files / best["local"], 2)),
        Figure(
            stage,
            "ray engine (a local Ray it starts)",
            round(files / best["ray"], 2),
            f"{res['overhead_ratio']}x local's time",
        ),
    ]
    for label, run in res["nodes"].items():
        out.append(Figure(stage, f"ray engine, {label}", run["img_per_s"]))
    for count, run in res["manifest"].items():
        out.append(
            Figure(
                "dens-infer --engine ray over a Parquet manifest (driver peak RSS)",
                f"{int(count):,} paths ({run['ok']} present)",
                run["files_per_s"],
                f"files/s; driver peak {run['driver_peak_rss_mib']:.0f} MiB",
            )
        )
    return out


def serve_figures(r: dict) -> list[Figure]:
    s, res = r["settings"], r["results"]
    stage = f"dens-serve ({s['associations']} associations, {s['instances']} instances, {s['model']})"
    latency = res["study_latency_beyond_quiet_window_s"]
    return [
        Figure(stage, "instances received", res["instances_per_s"], f"{res['megabytes_per_s']} MB/s"),
        Figure(
            stage,
            "studies answered (SR sent)",
            round(s["studies"] / res["all_srs_in_seconds_after_first_send"], 2),
            f"latency after the quiet window: median {latency['median']} s, p95 {latency['p95']} s",
        ),
    ]


def pull_figures(r: dict) -> list[Figure]:
    s, res = r["settings"], r["results"]
    stage = f"dens-infer from Orthanc ({s['instances']} instances)"
    out = []
    for name, run in res.items():
        setting = "folder run, the same files" if name == "folder" else f"{name} pull, fetched and scored"
        note = "" if name == "folder" else f"{run['ratio_to_folder']}x the folder run"
        if "pull_alone" in run:
            note += f"; the pull alone {run['pull_alone']['instances_per_s']} instances/s"
        out.append(Figure(stage, setting, run["instances_per_s"], note))
    return out


FIGURES = {
    "decode": decode_figures,
    "model": model_figures,
    "int8": int8_figures,
    "ray_engine": ray_figures,
    "serve": serve_figures,
    "pull": pull_figures,
    "pipeline": pipeline_figures,
    "scaling": scaling_figures,
    "train_step": train_figures,
    "gradcam": gradcam_figures,
    "gpu_decode": gpu_decode_figures,
}


def plot(host: str, figures: list[Figure], scaling: dict | None, out: Path) -> None:
    fig, (bars, curve) = plt.subplots(
        1, 2, figsize=(16, max(6, 0.28 * len(figures))), gridspec_kw={"width_ratios": [3, 1]}
    )
    stages = list(dict.fromkeys(f.stage for f in figures))
    colours = {stage: plt.cm.tab10(i % 10) for i, stage in enumerate(stages)}
    labels = [f"{f.stage}: {f.setting}" for f in figures]
    bars.barh(range(len(figures)), [max(f.img_per_s, 1e-3) for f in figures], color=[colours[f.stage] for f in figures])
    bars.set_yticks(range(len(figures)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.set_xlabel("images per second (log scale)")
    bars.set_title(f"{host}: img/s by stage and setting")
    for i, f in enumerate(figures):
        bars.text(max(f.img_per_s, 1e-3), i, f" {f.img_per_s:g}", va="center", fontsize=6)
    if scaling:
        points = scaling["points"]
        workers = [p["workers"] for p in points]
        curve.plot(workers, [p["img_per_s"] for p in points], "o-", label="dens-infer end to end")
        curve.plot(workers, [p["decode_pool_img_per_s"] or 0 for p in points], "s--", label="decode pool alone")
        curve.axhline(scaling["model_alone"]["img_per_s"], color="grey", linestyle=":", label="model alone (ORT)")
        for p in points:
            curve.annotate(
                p["bound"], (p["workers"], p["img_per_s"]), fontsize=7, textcoords="offset points", xytext=(3, 5)
            )
        curve.set_xticks(workers)
        curve.set_xlabel("decode workers")
        curve.set_ylabel("images per second")
        curve.set_title("scaling with decode workers")
        curve.legend(fontsize=7)
    else:
        curve.set_axis_off()
    fig.tight_layout()
    fig.subplots_adjust(left=0.3)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def table(host_key: tuple, runs: dict[str, tuple[Path, dict]], png: Path) -> str:
    host, cpu, cores, gpu = host_key
    lines = [
        f"### {host}: {cpu}, {cores} cores, GPU: {gpu or 'none'}",
        "",
        f"![img/s by stage](results/{png.name})",
        "",
        "| benchmark | result | command | load average at the end |",
        "|---|---|---|---|",
    ]
    for name, (path, record) in runs.items():
        load = record.get("load_average_end")
        load_text = f"{load[0]:.1f}" if load else "not recorded"
        lines.append(f"| {name} | [{path.name}](results/{path.name}) | `{record.get('command', '?')}` | {load_text} |")
    lines += ["", "| stage | setting | img/s | notes |", "|---|---|---:|---|"]
    for name, (_, record) in runs.items():
        lines += [f"| {f.stage} | {f.setting} | {f.img_per_s:g} | {f.note} |" for f in FIGURES[name](record)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args = parser.parse_args()
    sections = []
    # A machine with only benchmarks that have no img/s figures (real_learning) gets no plot and no table.
    runs_by_machine = {key: runs for key, runs in newest_runs(args.results).items() if set(runs) & set(FIGURES)}
    for key, runs in sorted(runs_by_machine.items()):
        ordered = {name: runs[name] for name in FIGURES if name in runs}
        figures = [f for name, (_, record) in ordered.items() for f in FIGURES[name](record)]
        png = args.results / f"summary-{machine_label(key, runs_by_machine)}.png"
        title = f"{key[0]} ({key[1]}, {key[2]} cores{', ' + key[3] if key[3] else ''})"
        plot(title, figures, ordered.get("scaling", (None, None))[1], png)
        sections.append(table(key, ordered, png))
        print(f"wrote {png} ({len(figures)} figures)")
    readme = args.readme.read_text() if args.readme.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in readme or END not in readme:
        raise SystemExit(f"{args.readme}: the markers {START} and {END} are missing")
    head, rest = readme.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.readme.write_text(f"{head}{START}\n\n" + "\n\n".join(sections) + f"\n\n{END}{tail}")
    print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
