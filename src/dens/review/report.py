"""What a reviewer sees: ``report.html``, one page a radiologist reviews the calls on and records a verdict per
exam, with each view's pictures (:mod:`dens.review.views`).

The page carries everything it shows (images as ``data:`` URIs), so it can be moved or mailed alone and
opened offline. Its only script is inline, allowed by a nonce in a Content-Security-Policy that lets in
no other script, style file, font or frame. Every string from a DICOM header or a file name is escaped:
names and IDs are untrusted input. The script keeps the reviewer's verdicts in the browser's localStorage
under the page's run (a reload keeps them) and exports them as a CSV keyed as preds.exam.csv keys exams;
``dens-verdicts`` (:mod:`dens.verdicts`) merges that CSV back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dens import counted, exams, labels
from dens.artifact import modelcard
from dens.files import atomic_write
from dens.review import display, page, study

REPORT_SUFFIX = ".report.html"  # preds.csv -> preds.report.html
# Hung as PACS hangs a screening exam: each pair back to back, right breast on the viewer's left.
VIEW_SLOTS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
# Where an exam's call comes from, shown when hovering it.
FROM_FILE, FROM_PREDS = "preds.exam.csv", "dens-infer's exam rule, from preds.csv"
# The page's filters: an exam row carries each tag that applies to it.
FILTERS = (
    ("flagged", "an image flagged for review (it has a Grad-CAM map)"),
    ("dense", "called C or D"),
    ("asymmetric", "left and right breasts on different sides of the dense line"),
    ("incomplete", "a standard view missing"),
    ("errors", "a file of the exam without a call"),
    ("unreviewed", "no verdict yet"),
)


# --- the page -------------------------------------------------------------------------------------


def report_path(preds_csv: str | os.PathLike) -> Path:
    """The review page of ``preds_csv``, beside it and named after it (``preds.csv`` -> ``preds.report.html``), so
    that runs writing their preds.csv into one folder keep their own pages."""
    preds_csv = Path(preds_csv)
    return preds_csv.with_name(preds_csv.stem + REPORT_SUFFIX)


def write_report(
    preds: pd.DataFrame,
    preds_csv: Path,
    thumbs: Mapping[int, Path],
    *,
    overlays: Mapping[int, Path] | None = None,
    overlay_thumbs: Mapping[int, Path] | None = None,
    own_overlays: Mapping[int, Path] | None = None,
    own_overlay_thumbs: Mapping[int, Path] | None = None,
    exam_calls: pd.DataFrame | None = None,
    card: Mapping | None = None,
    scale: str = "",
    studies: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write the review page beside ``preds_csv`` (:func:`report_path`; atomically) and return its path.

    ``preds``: preds.csv as strings; ``thumbs``: row index -> thumbnail file (WebP); ``overlays``: row ->
    the overlay figure (any image OpenCV reads; embedded as WebP); ``overlay_thumbs``: row -> its thumbnail;
    ``own_overlays``, ``own_overlay_thumbs``: the same on each map's own scale, which the page offers as a toggle
    (:mod:`dens.review.views`).
    ``exam_calls``: preds.exam.csv as written by dens-infer. An exam it lacks or that it describes otherwise
    (other images, another model: a stale file), and every exam when it is None, is called from ``preds``
    by the same rule (:mod:`dens.exams`); the call's cell says which source it came from. ``card``: the
    model card's facts (:mod:`dens.artifact.modelcard`), summed up in the page's header; {} or None for a model
    without one. ``scale``: what 1.0 on the maps' colour bar is, stated on the page. ``studies``: exam key ->
    its study date and the woman's age (:func:`dens.review.study.exam_facts`), shown with its identity.
    """
    html_path = report_path(preds_csv)
    overlays, overlay_thumbs = overlays or {}, overlay_thumbs or {}
    own = {i: (own_overlays[i], (own_overlay_thumbs or {}).get(i)) for i in own_overlays or {}}
    studies = studies or {}
    records = preds.to_dict("index")
    ok = {i for i, r in records.items() if r.get(labels.STATUS) == "ok"}
    members_of: dict[str, list[int]] = {}
    for i in sorted(ok):
        members_of.setdefault(exams.exam_key(records[i]), []).append(i)
    unusable = [i for i in records if i not in ok]
    failed_in: dict[str, int] = {}
    for i in unusable:
        if any(records[i].get(k) for k in exams.IDENTITY):  # a file whose header said whose exam it is
            key = exams.exam_key(records[i])
            failed_in[key] = failed_in.get(key, 0) + 1
    calls = _exam_calls(exam_calls, preds)
    run = run_id(preds, calls)

    rows = []
    for key, members in members_of.items():
        # Every distinct value: rows of one exam that disagree on a patient ID are worth seeing.
        ident = {
            k: list(dict.fromkeys(records[i].get(k, "") for i in members if records[i].get(k))) for k in exams.IDENTITY
        }
        call = calls[key]
        cells: dict = {slot: [] for slot in (*VIEW_SLOTS, None)}
        flagged = False
        # Right before left within a slot, as the hanging goes (the "other" slot holds several).
        for i in sorted(
            members, key=lambda i: (records[i].get(labels.LATERALITY, "") != "R", records[i].get(labels.VIEW, ""))
        ):
            r = records[i]
            slot = (r.get(labels.LATERALITY, "").upper(), r.get(labels.VIEW, "").upper())
            flagged |= i in overlays
            cells[slot if slot in cells else None].append(
                _figure(r, thumbs.get(i), overlays.get(i), overlay_thumbs.get(i), own.get(i, (None, None)))
            )
        tags = _tags(call, flagged, failed_in.get(key, 0))
        row = _exam_row(key, ident, call, tags, failed_in.get(key, 0), cells, studies.get(key, {}))
        rows.append((call["p_dense"], tags, row))
    rows.sort(key=lambda item: -item[0] if item[0] == item[0] else 1.0)  # descending, NaN last

    counts = {name: sum(name in tags for _, tags, _ in rows) for name, _ in FILTERS}
    counts["unreviewed"] = len(rows)
    nonce = secrets.token_urlsafe(16)
    html_page = page.PAGE.format(
        nonce=nonce,
        run=_e(run),
        title=_e(f"dens review: {preds_csv.name}"),
        summary=_e(_summary_text(preds, len(members_of), len(overlays))),
        card=_card_block(card or {}),
        conventions=_conventions(scale),
        filters="".join(
            f'<button type="button" class="filter" data-filter="{name}" aria-pressed="false" title="{_e(why)}">'
            f'{name} <span class="n">{counts[name]}</span></button>'
            for name, why in FILTERS
        ),
        exams=len(rows),
        rows="\n".join(row for *_, row in rows),
        unusable=_unusable_table([records[i] for i in unusable]),
        columns=_e(json.dumps(page.VERDICT_COLUMNS)),
        script=page.SCRIPT,
    )
    # The page states its own size (images included): whether it can be mailed is the reader's question.
    size = len(html_page.encode("utf-8"))
    html_page = html_page.replace(
        _SIZE_MARK, _e(f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} kB"), 1
    )
    with atomic_write(html_path, "w", encoding="utf-8") as f:
        f.write(html_page)
    return html_path


def run_id(preds: pd.DataFrame, calls: Mapping[str, Mapping]) -> str:
    """What the page's verdicts are stored under in the browser: a digest of the model and every exam's
    call, the same whenever the page is written again for the same calls (a reload, a second dens-gradcam),
    another for other calls (the verdicts of one run never show on another's page)."""
    models = sorted({s for s in preds.get(labels.MODEL_SHA256, pd.Series(dtype=str)) if s})
    lines = [*models, *(f"{key}\t{calls[key]['density']}" for key in sorted(calls))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _exam_calls(table: pd.DataFrame | None, preds: pd.DataFrame) -> dict[str, dict]:
    """Exam key -> its call (density, p_dense, source, density_L/R, incomplete, missing_views) for every exam
    of ``preds``: ``table``'s row where it describes the same exam (as many images, the same model, where it
    has those columns), else the rule's own."""
    given, checked = {}, []
    if table is not None and all(c in table for c in (exams.EXAM, labels.DENSITY, labels.P_DENSE)):
        given = {str(r[exams.EXAM]): r for r in table.to_dict("records")}
        checked = [c for c in (exams.N_IMAGES, labels.MODEL_SHA256) if c in table]
    calls = {}
    for own in exams.exam_calls(preds).to_dict("records"):
        row = given.get(own[exams.EXAM])
        current = row is not None and all(str(row[c]) == own[c] for c in checked)
        chosen, source = (row, FROM_FILE) if current else (own, FROM_PREDS)
        calls[own[exams.EXAM]] = {
            **{c: str(chosen.get(c, own[c])) for c in _EXAM_FACTS},
            "density": str(chosen[labels.DENSITY]),
            "p_dense": _float(chosen[labels.P_DENSE]),
            "source": source,
        }
    return calls


_FACTS = ((study.STUDY_DATE, "study date"), (study.AGE, "age"))  # shown under an exam's identity
_EXAM_FACTS = ("density_L", "density_R", exams.INCOMPLETE, exams.MISSING_VIEWS)


def _tags(call: Mapping, flagged: bool, failed: int) -> list[str]:
    left, right = call["density_L"], call["density_R"]
    asymmetric = bool(left and right) and labels.is_dense(left) != labels.is_dense(right)
    return [
        name
        for name, present in (
            ("flagged", flagged),
            ("dense", labels.is_dense(call["density"])),
            ("asymmetric", asymmetric),
            ("incomplete", call[exams.INCOMPLETE].lower() == "true"),
            ("errors", failed > 0),
            ("unreviewed", True),
        )
        if present
    ]


def _embedded(path: Path | None) -> tuple[str, str]:
    """A thumbnail file as a data: URI and its ``width`` and ``height`` attributes, so the page's layout does
    not move as images load ('' and '' when there is none)."""
    if path is None:
        return "", ""
    data = Path(path).read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    size = f' width="{image.shape[1]}" height="{image.shape[0]}"' if image is not None else ""
    return display.data_uri(data), size


def _figure_uri(path: Path | None) -> str:
    """An overlay figure re-encoded for the page ('' when there is none or it cannot be read)."""
    if path is None:
        return ""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return "" if image is None else display.data_uri(display.encode(image, display.FIGURE_QUALITY))


def _figure(
    r: Mapping[str, str],
    thumb: Path | None,
    overlay: Path | None,
    overlay_thumb: Path | None,
    own: tuple[Path | None, Path | None],
) -> str:
    name = f"{r.get(labels.LATERALITY) or '?'} {r.get(labels.VIEW) or '?'}"
    p_dense = _float(r.get(labels.P_DENSE))
    caption = f"{name}: {r.get(labels.DENSITY, '')} · p_dense {p_dense:.2f}"
    title = f"{r.get(labels.PATH, '')}\nSOP {r.get(labels.SOP_UID, '')}"
    parts = [f'<figure title="{_e(title)}">']
    src, size = _embedded(thumb)
    if src:
        parts.append(f'<img src="{src}"{size} alt="{_e(name)}" loading="lazy" decoding="async">')
    else:
        parts.append(f'<div class="missing">{_e(name)}: no thumbnail</div>')
    full = _figure_uri(overlay)
    if full:
        small, size = _embedded(overlay_thumb)
        own_full = _figure_uri(own[0])  # the map on its own scale: the page's scale toggle shows it instead
        own_small = (_embedded(own[1])[0] or own_full) if own_full else ""
        own_attrs = f' data-own-src="{own_small}" data-own-full="{own_full}"' if own_full else ""
        parts.append(
            f'<img class="cam" src="{small or full}"{size} data-full="{full}"{own_attrs} alt="Grad-CAM {_e(name)}" '
            'loading="lazy" decoding="async" title="Grad-CAM: click for the full-size figure">'
        )
    parts.append(f"<figcaption>{_e(caption)}</figcaption></figure>")
    return "".join(parts)


def _exam_row(
    key: str,
    ident: dict[str, list[str]],
    call: Mapping,
    tags: list[str],
    failed: int,
    cells: dict,
    facts: Mapping[str, str],
) -> str:
    shown = [(k, ", ".join(v)) for k, v in ident.items() if v]
    shown += [(name, facts[k]) for k, name in _FACTS if facts.get(k)]  # the study date, the woman's age
    ident_html = "<br>".join(f'<span class="k">{_e(k)}</span> {_e(v)}' for k, v in shown)
    badges = []
    if "asymmetric" in tags:
        badges.append('<span class="badge">L/R across the dense line</span>')
    if failed:
        badges.append(f'<span class="badge err">{failed} file{"s" * (failed > 1)} without a call</span>')
    density, p_dense = call["density"], call["p_dense"]
    p_text = f"{p_dense:.3f}" if p_dense == p_dense else "–"
    sort_value = f"{p_dense:.6f}" if p_dense == p_dense else "-1"
    sides = " · ".join(f"{s} {call[f'density_{s}']}" for s in ("R", "L") if call[f"density_{s}"])
    # An incomplete exam is called on the breasts it has: under its call, what it lacks, in the SR's words.
    imaged = [s for s in ("L", "R") if call[f"density_{s}"]]
    missing = exams.describe_missing([v for v in call[exams.MISSING_VIEWS].split(";") if v], imaged)
    missing_html = f'<div class="sides">{_e(missing)}</div>' if missing else ""
    tds = "".join(f'<td class="view">{"".join(cells[slot])}</td>' for slot in (*VIEW_SLOTS, None))
    data = {
        "exam": key,
        **{k.replace("_", "-"): (v[0] if v else "") for k, v in ident.items()},
        "call": density,
        "p-dense": sort_value,
        "tags": " ".join(tags),
    }
    attrs = " ".join(f'data-{k}="{_e(v)}"' for k, v in data.items())
    categories = "".join(
        f'<button type="button" data-category="{c}" aria-pressed="false">{c}</button>' for c in labels.CLASSES
    )
    verdicts = "".join(
        f'<button type="button" data-verdict="{v}" aria-pressed="false">{v}</button>'
        for v in (page.AGREE, page.DISAGREE)
    )
    verdict = (
        f'<div class="verdict">{verdicts}</div>'
        f'<div class="categories" title="the category you would give">{categories}</div>'
    )
    return (
        f'<tr class="exam{" dense" * ("dense" in tags)}" {attrs}>'
        f'<td class="id">{ident_html or _e(key)}{"".join(badges)}</td>'
        f'<td class="call" title="{_e(call["source"])}">{_e(density)}<div class="p">{_e(p_text)}</div>'
        f'<div class="sides">{_e(sides)}</div>{missing_html}</td>'
        f'{tds}<td class="review">{verdict}</td></tr>'
    )


def _unusable_table(rows: list[Mapping[str, str]]) -> str:
    if not rows:
        return ""
    body = "".join(
        f"<tr><td>{_e(r.get(labels.STATUS, ''))}</td><td>{_e(r.get(labels.REASON, ''))}</td>"
        f"<td>{_e(r.get(labels.PATH, ''))}</td></tr>"
        for r in rows
    )
    return (
        f'<h2>Files without a call ({len(rows)})</h2><table class="plain"><thead><tr><th>status</th>'
        f"<th>reason</th><th>path</th></tr></thead><tbody>{body}</tbody></table>"
    )


def _card_block(card: Mapping) -> str:
    """The model card's summary lines (what the model is, its test figures, what must not be missed), the
    warnings in red, as the page's header."""
    lines = modelcard.summary_lines(card)
    warn = bool(modelcard.caveats({modelcard.CARD_KEY: card})) or not card
    paragraphs = "".join(
        f'<p class="caveat">{_e(line)}</p>' if line.startswith("Warning") or not card else f"<p>{_e(line)}</p>"
        for line in lines
    )
    return f'<div class="card{" warn" if warn else ""}" id="model-card">{paragraphs}</div>'


def _conventions(scale: str) -> str:
    scale_text = scale or "1 is the largest map value on this page"
    return (
        "<p><b>Orientation:</b> images are shown as PACS hangs them: right breasts with the chest wall on the "
        "right, left breasts with it on the left, each pair back to back (R CC | L CC, R MLO | L MLO). The model "
        "itself reads every image with the chest wall on the left (right breasts mirrored); its maps are "
        "mirrored back with the image.</p>"
        f"<p><b>Grad-CAM</b> (beside a flagged view; click it for the full-size figure, a view for a larger "
        "one): where the model looked "
        f"for the class it called, in the {display.COLORMAP_NAME} colour map (dark: little, yellow: much), "
        f"masked to the breast, on <b>one scale for the whole page</b>: {_e(scale_text)}, so that maps can be "
        "compared. <i>Grad-CAM scale</i> above shows each map on its own scale instead (1 = its own largest "
        "value): a weak map, nearly invisible beside a strong one, is then seen in full, but maps no longer "
        "compare. A map is not a finding.</p>"
        "<p><b>Exam call:</b> the denser breast's, a breast's probabilities being the mean of its views; from "
        "preds.exam.csv where it describes the exam, else by the same rule from preds.csv (hover the call). An "
        "exam missing a view or a side is called on what it has, and says under its call what it lacks.</p>"
        "<p><b>Verdicts:</b> mark each exam <i>agree</i> or <i>disagree</i> and the category you would give "
        "(a category alone marks the verdict too), under your name (<i>Reviewer</i> above; each verdict records "
        "who gave it). They stay in this browser for this page's run; <i>Export "
        "verdicts</i> downloads them as a CSV that <code>dens-verdicts preds.exam.csv verdicts.csv</code> merges "
        "and scores.</p>"
    )


_SIZE_MARK = "@@PAGE-SIZE@@"  # replaced by the page's size once it is known


def _summary_text(preds: pd.DataFrame, exams_n: int, maps: int) -> str:
    status = preds[labels.STATUS].value_counts().to_dict() if labels.STATUS in preds else {}
    counts = ", ".join(f"{status.get(s, 0)} {s}" for s in ("ok", "skipped", "error"))
    models = sorted({s[:12] for s in preds.get(labels.MODEL_SHA256, pd.Series(dtype=str)) if s})
    return (
        f"{counted(exams_n, 'exam')}, {counted(len(preds), 'file')} ({counts}), {counted(maps, 'Grad-CAM map')}; "
        "model sha256 "
        f"{', '.join(models) or 'unknown'}; written {dt.datetime.now():%Y-%m-%d %H:%M}; this page {_SIZE_MARK} "
        "with its images"
    )
