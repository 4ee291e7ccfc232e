"""What a reviewer sees: Grad-CAM overlays with a colour bar, thumbnails, and ``report.html``.

The page is static and offline: images are files beside it, referenced relatively; the only script is a
few lines of inline JS (sorting), allowed by a nonce in the page's Content-Security-Policy. Every string
that came from a DICOM header or a file name is HTML-escaped: names and IDs are untrusted input.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from dens import exams, labels, modelcard
from dens.files import atomic_write

THUMBS = "thumbs"
THUMB_SIDE = 192
REPORT = "report.html"
VIEW_SLOTS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
# Where an exam's call comes from, shown when hovering it.
FROM_FILE, FROM_PREDS = "preds.exam.csv", "dens-infer's exam rule, from preds.csv"
_ALPHA = 0.45  # heatmap weight in the overlay: the tissue stays readable underneath


# --- pictures -------------------------------------------------------------------------------------


def render_overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The canonical image (uint8 [S, S]) under its map ([0, 1], [S, S]) in the turbo colour map, with a
    labelled colour bar on the right; BGR uint8 [S, S + bar]."""
    size = image.shape[0]
    heat = cv2.applyColorMap(np.rint(np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    blend = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), 1 - _ALPHA, heat, _ALPHA, 0)

    pad, bar_w = max(4, size // 32), max(6, size // 28)
    scale = max(0.3, size / 1024)
    thick = max(1, round(size / 512))
    text_w = cv2.getTextSize("1.0", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
    panel = np.full((size, 3 * pad + bar_w + text_w, 3), 32, np.uint8)
    height = size - 2 * pad
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None]  # top = 1.0
    panel[pad : pad + height, pad : pad + bar_w] = cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), cv2.COLORMAP_TURBO)
    for value in (1.0, 0.5, 0.0):
        y = pad + round((1 - value) * (height - 1))
        baseline = min(size - 2, max(pad + 8 * thick, y + 4 * thick))
        cv2.putText(
            panel,
            f"{value:.1f}",
            (2 * pad + bar_w, baseline),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (235, 235, 235),
            thick,
            cv2.LINE_AA,
        )
    return np.hstack([blend, panel])


def thumbnail(image: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """A small copy for the page (area-averaged when shrinking)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def write_thumbnail(out_dir: Path, stem: str, image: np.ndarray) -> Path:
    """``out_dir/thumbs/<stem>.png``."""
    path = out_dir / THUMBS / f"{stem}.png"
    _imwrite(path, thumbnail(image))
    return path


def write_cam_files(out_dir: Path, stem: str, image: np.ndarray, cam: np.ndarray) -> Path:
    """For one flagged image: ``<stem>.png`` (overlay with colour bar), ``<stem>.npy`` (the map, float16
    [S, S] in [0, 1]: half the disk, nothing visible lost) and its thumbnail. Returns the overlay's path."""
    overlay = out_dir / f"{stem}.png"
    _imwrite(overlay, render_overlay(image, cam))
    np.save(out_dir / f"{stem}.npy", cam.astype(np.float16))
    write_thumbnail(out_dir, stem, image)
    return overlay


def _imwrite(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


# --- the page -------------------------------------------------------------------------------------


def write_report(
    preds: pd.DataFrame,
    preds_csv: Path,
    thumbs: Mapping[int, Path],
    *,
    overlays: Mapping[int, str] | None = None,
    exam_calls: pd.DataFrame | None = None,
    card: Mapping | None = None,
) -> Path:
    """Write ``report.html`` beside ``preds_csv`` (atomically) and return its path.

    ``preds``: preds.csv as strings; ``thumbs``: row index -> thumbnail file; ``overlays``: row index ->
    overlay path relative to preds.csv's folder (default: the ``gradcam`` column); ``exam_calls``:
    preds.exam.csv as written by dens-infer. An exam it lacks or that it describes otherwise (other images,
    another model: a stale file), and every exam when it is None, is called from ``preds`` by the same rule
    (:mod:`dens.exams`); the call's cell says which source it came from. ``card``: the model card's facts
    (:mod:`dens.modelcard`), summed up in the page's header; {} or None for a model without one.
    """
    html_path = preds_csv.parent / REPORT
    base = html_path.parent.resolve()
    if overlays is None:
        column = preds[labels.GRADCAM] if labels.GRADCAM in preds else pd.Series("", index=preds.index)
        overlays = {i: v for i, v in column.items() if v}
    records = preds.to_dict("index")
    ok = {i for i, r in records.items() if r.get(labels.STATUS) == "ok"}
    members_of: dict[str, list[int]] = {}
    for i in sorted(ok):
        members_of.setdefault(exams.exam_key(records[i]), []).append(i)
    calls = _exam_calls(exam_calls, preds)

    rows = []
    for key, members in members_of.items():
        # Every distinct value: rows of one exam that disagree on a patient ID are worth seeing.
        ident = {
            k: list(dict.fromkeys(records[i].get(k, "") for i in members if records[i].get(k)))
            for k in (labels.PATIENT_ID, labels.ACCESSION, labels.STUDY_UID)
        }
        call, p_dense, source = calls[key]
        cells = {slot: [] for slot in (*VIEW_SLOTS, None)}
        for i in members:
            r = records[i]
            slot = (r.get(labels.LATERALITY, "").upper(), r.get(labels.VIEW, "").upper())
            cells[slot if slot in cells else None].append(_figure(r, thumbs.get(i), overlays.get(i), base, preds_csv))
        rows.append((p_dense, _exam_row(key, ident, call, p_dense, source, cells)))
    rows.sort(key=lambda item: -item[0] if item[0] == item[0] else 1.0)  # descending, NaN last

    unusable = [records[i] for i in records if i not in ok]
    nonce = secrets.token_urlsafe(16)
    page = _PAGE.format(
        nonce=nonce,
        title=_e(f"dens review: {preds_csv.name}"),
        summary=_e(_summary_text(preds, len(members_of), len(overlays))),
        card=_card_block(card or {}),
        rows="\n".join(row for _, row in rows),
        unusable=_unusable_table(unusable),
        script=_SCRIPT,
    )
    with atomic_write(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    return html_path


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _exam_calls(table: pd.DataFrame | None, preds: pd.DataFrame) -> dict[str, tuple[str, float, str]]:
    """Exam key -> (call, p_dense, source) for every exam of ``preds``: ``table``'s row where it describes
    the same exam (as many images, the same model, where it has those columns), else the rule's own."""
    given, checked = {}, []
    if table is not None and all(c in table for c in (exams.EXAM, labels.DENSITY, labels.P_DENSE)):
        given = {str(r[exams.EXAM]): r for r in table.to_dict("records")}
        checked = [c for c in (exams.N_IMAGES, labels.MODEL_SHA256) if c in table]
    calls = {}
    for own in exams.exam_calls(preds).to_dict("records"):
        row = given.get(own[exams.EXAM])
        current = row is not None and all(str(row[c]) == own[c] for c in checked)
        chosen, source = (row, FROM_FILE) if current else (own, FROM_PREDS)
        calls[own[exams.EXAM]] = (str(chosen[labels.DENSITY]), _float(chosen[labels.P_DENSE]), source)
    return calls


def _src(path: Path | str, base: Path) -> str:
    """A reference to a file (absolute, or relative to the working directory) from the page in ``base``:
    relative, URL-quoted (and HTML-escaped again where it lands in an attribute)."""
    return quote(Path(os.path.relpath(Path(path).resolve(), base)).as_posix())


def _figure(r: Mapping[str, str], thumb: Path | None, overlay: str | None, base: Path, preds_csv: Path) -> str:
    name = f"{r.get(labels.LATERALITY, '')} {r.get(labels.VIEW, '')}".strip() or "view"
    caption = f"{r.get(labels.DENSITY, '')} · p_dense {_float(r.get(labels.P_DENSE)):.2f}"
    title = f"{r.get(labels.PATH, '')}\nSOP {r.get(labels.SOP_UID, '')}"
    parts = [f'<figure title="{_e(title)}">']
    if thumb is not None:
        src = _e(_src(thumb, base))
        parts.append(f'<a href="{src}"><img src="{src}" alt="{_e(name)}" loading="lazy"></a>')
    else:
        parts.append(f'<div class="missing">{_e(name)}: no thumbnail</div>')
    if overlay:
        src = _e(_src(preds_csv.parent.resolve() / overlay, base))
        parts.append(f'<a href="{src}"><img class="cam" src="{src}" alt="Grad-CAM {_e(name)}" loading="lazy"></a>')
    parts.append(f"<figcaption>{_e(name)}: {_e(caption)}</figcaption></figure>")
    return "".join(parts)


def _exam_row(key: str, ident: dict[str, list[str]], call: str, p_dense: float, source: str, cells: dict) -> str:
    ident_html = "<br>".join(f'<span class="k">{_e(k)}</span> {_e(", ".join(v))}' for k, v in ident.items() if v)
    dense = "dense" if labels.is_dense(call) else ""
    p_text = f"{p_dense:.3f}" if p_dense == p_dense else "–"
    sort_value = f"{p_dense:.6f}" if p_dense == p_dense else "-1"
    tds = "".join(f"<td>{''.join(cells[slot])}</td>" for slot in (*VIEW_SLOTS, None))
    return (
        f'<tr class="{dense}" data-p-dense="{sort_value}"><td class="id">{ident_html or _e(key)}</td>'
        f'<td class="call" title="{_e(source)}">{_e(call)}</td>'
        f'<td class="p">{_e(p_text)}</td>{tds}</tr>'
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


def _summary_text(preds: pd.DataFrame, exams: int, maps: int) -> str:
    status = preds[labels.STATUS].value_counts().to_dict() if labels.STATUS in preds else {}
    counts = ", ".join(f"{status.get(s, 0)} {s}" for s in ("ok", "skipped", "error"))
    models = sorted({s[:12] for s in preds.get("model_sha256", pd.Series(dtype=str)) if s})
    return (
        f"{exams} exams, {len(preds)} files ({counts}), {maps} Grad-CAM maps; model sha256 "
        f"{', '.join(models) or 'unknown'}; written {dt.datetime.now():%Y-%m-%d %H:%M}"
    )


_SCRIPT = """
const body = document.querySelector("#exams tbody"), button = document.getElementById("sort");
let descending = true;
button.addEventListener("click", () => {
  descending = !descending;
  const rows = Array.from(body.rows), sign = descending ? -1 : 1;
  rows.sort((a, b) => sign * (parseFloat(a.dataset.pDense) - parseFloat(b.dataset.pDense)));
  for (const row of rows) body.appendChild(row);
  button.textContent = "p_dense " + (descending ? "\\u2193 (highest first)" : "\\u2191 (lowest first)");
});
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data: file:; \
style-src 'unsafe-inline'; script-src 'nonce-{nonce}'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fafafa; }}
h1 {{ font-size: 1.4em; margin: 0 0 .3em; }}
.summary {{ color: #555; margin: 0 0 1em; }}
.card {{ border-left: 4px solid #999; background: #fff; padding: .4em .8em; margin: 0 0 1em; max-width: 60em; }}
.card.warn {{ border-left-color: #c0392b; }}
.card p {{ margin: .2em 0; }}
.card .caveat {{ color: #c0392b; font-weight: bold; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; background: #fff; }}
th {{ background: #eee; position: sticky; top: 0; }}
tr.dense td.call {{ background: #ffe1cc; font-weight: bold; }}
td.call {{ font-size: 1.4em; text-align: center; }}
td.id {{ max-width: 16em; overflow-wrap: anywhere; font-size: .85em; }}
.k {{ color: #888; }}
figure {{ margin: 0 0 4px; display: inline-block; text-align: center; }}
figure img {{ width: 128px; height: 128px; object-fit: contain; background: #000; display: inline-block; }}
figure img.cam {{ width: auto; margin-left: 2px; }}
figcaption {{ font-size: .8em; color: #444; }}
.missing {{ width: 128px; height: 128px; background: #333; color: #ccc; font-size: .8em; }}
button {{ font: inherit; margin-bottom: .8em; }}
</style></head><body>
<h1>{title}</h1>
<p class="summary">{summary}</p>
{card}
<p>Exam call: the denser breast's, a breast's probabilities being the mean of its views; from preds.exam.csv
where it describes the exam, else by the same rule from preds.csv (hover the call). A Grad-CAM map (under a
flagged view) shows where the model looked for the class it called; click an image for full size.</p>
<button id="sort" type="button">p_dense &#8595; (highest first)</button>
<table id="exams"><thead><tr><th>exam</th><th>call</th><th>p_dense</th><th>L CC</th><th>L MLO</th><th>R CC</th>
<th>R MLO</th><th>other</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{unusable}
<script nonce="{nonce}">{script}</script>
</body></html>
"""
