"""The review page and its pictures: overlays carry a colour bar, exams are grouped and sorted by p_dense,
header values are shown as text (never markup), the page works offline, and it renders in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from dens import exams, labels
from dens.explain import assign_stems, report

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_ATTR = 'x" onerror="alert(2)'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)"
)


def _probs(density: str, p_dense: float) -> dict[str, str]:
    """p_A..p_D whose argmax is ``density`` and whose dense classes sum to ``p_dense``, as dens-infer writes
    them: the called class takes 80% of its side's share (dense or not), its neighbour the rest."""
    dense = labels.is_dense(density)
    share = p_dense if dense else 1 - p_dense
    probs = {
        c: (0.8 if c == density else 0.2) * share if labels.is_dense(c) == dense else (1 - share) / 2
        for c in labels.CLASSES
    }
    return {f"p_{c}": f"{p:.6f}" for c, p in probs.items()}


def _row(exam: int, lat: str, view: str, density: str, p_dense: float, **identity) -> dict:
    probs = _probs(density or "A", p_dense)
    ident = {
        labels.PATIENT_ID: f"P{exam}",
        labels.ACCESSION: f"A{exam}",
        labels.STUDY_UID: f"1.2.{exam}",
        labels.SERIES_UID: f"1.2.{exam}.1",
        labels.SOP_UID: f"1.2.{exam}.{lat}{view}",
        **identity,
    }
    return {
        labels.PATH: f"/data/{exam}/{lat}{view}.dcm",
        labels.STATUS: "ok",
        labels.REASON: "",
        **ident,
        labels.LATERALITY: lat,
        labels.VIEW: view,
        **probs,
        labels.DENSITY: density,
        labels.P_DENSE: f"{p_dense:.4f}",
        labels.DENSE: str(labels.is_dense(density)),
        "flagged": str(labels.is_dense(density)),
        "model_sha256": "ab" * 32,
    }


@pytest.fixture
def page(tmp_path) -> dict:
    """Three exams (one keyed by accession only, one with hostile header values), an unreadable file with
    a hostile path, thumbnails and overlays written by the report module."""
    rows = [_row(1, lat, view, "B", 0.2 + 0.01 * k) for k, (lat, view) in enumerate(report.VIEW_SLOTS)]
    rows += [
        _row(2, "L", "CC", "D", 0.95, **{labels.STUDY_UID: ""}),
        _row(2, "R", "MLO", "C", 0.6, **{labels.STUDY_UID: ""}),
        _row(2, "R", "XCCL", "B", 0.3, **{labels.STUDY_UID: ""}),
    ]
    rows += [
        _row(
            3,
            "L",
            "CC",
            "C",
            0.7,
            **{labels.PATIENT_ID: HOSTILE_NAME, labels.SOP_UID: "../../etc/passwd", labels.ACCESSION: HOSTILE_ATTR},
        )
    ]
    rows.append(
        {
            **_row(4, "L", "CC", "", 0.0),
            labels.STATUS: "error",
            labels.REASON: "corrupt_pixel_data",
            labels.PATH: f"/data/{HOSTILE_NAME}/{HOSTILE_ATTR}.dcm",
            labels.P_DENSE: "",
        }
    )
    preds = pd.DataFrame(rows)
    out = tmp_path / "cams"
    stems = assign_stems(preds[labels.SOP_UID].tolist(), preds[labels.PATH].tolist())
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    thumbs, overlays = {}, {}
    for i, r in preds.iterrows():
        if r[labels.STATUS] != "ok":
            continue
        image = np.clip(rng.normal(110, 40, (96, 96)), 0, 255).astype(np.uint8)
        if r["flagged"] == "True":
            cam = np.exp(-((yy - 40) ** 2 + (xx - 30) ** 2) / 300).astype(np.float32)
            overlays[i] = report.write_cam_files(out, stems[i], image, cam).relative_to(tmp_path).as_posix()
            thumbs[i] = out / report.THUMBS / f"{stems[i]}.png"
        else:
            thumbs[i] = report.write_thumbnail(out, stems[i], image)
    preds["gradcam"] = [overlays.get(i, "") for i in range(len(preds))]
    preds_csv = tmp_path / "preds.csv"
    preds.to_csv(preds_csv, index=False)
    path = report.write_report(preds, preds_csv, thumbs, overlays=overlays)
    return {"path": path, "html": path.read_text(), "preds": preds, "preds_csv": preds_csv, "thumbs": thumbs}


def test_overlay_is_the_image_under_the_map_with_a_colour_bar():
    image = np.full((128, 128), 100, np.uint8)
    cam = np.zeros((128, 128), np.float32)
    cam[20:40, 60:80] = 1.0
    overlay = report.render_overlay(image, cam)
    assert overlay.shape[0] == 128 and overlay.shape[1] > 128 and overlay.dtype == np.uint8
    turbo = cv2.applyColorMap(np.array([[0, 255]], np.uint8), cv2.COLORMAP_TURBO)[0].astype(int)
    hot, cold = overlay[30, 70].astype(int), overlay[100, 10].astype(int)
    expected = lambda c: np.rint(100 * (1 - 0.45) + c * 0.45)  # noqa: E731
    assert np.abs(hot - expected(turbo[1])).max() <= 1 and np.abs(cold - expected(turbo[0])).max() <= 1
    bar = overlay[:, 128:]
    column = bar[:, np.argmax(np.abs(bar.astype(int) - 32).sum(axis=(0, 2)))]  # a column through the bar
    rows = np.flatnonzero(np.abs(column.astype(int) - 32).sum(axis=1) > 30)
    assert np.abs(column[rows[0]].astype(int) - turbo[1]).max() <= 12  # top of the bar: 1.0
    assert np.abs(column[rows[-1]].astype(int) - turbo[0]).max() <= 12  # bottom: 0.0


def test_hostile_header_values_are_escaped_everywhere(page):
    html = page["html"]
    assert HOSTILE_NAME not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onerror="' not in html and "x&quot; onerror=&quot;alert(2)" in html
    assert len(re.findall(r"<script\b", html)) == 1  # ours, and it carries the CSP nonce
    nonce = re.search(r"script-src 'nonce-([^']+)'", html).group(1)
    assert f'<script nonce="{nonce}">' in html


def test_page_is_offline_and_its_images_are_the_files_beside_it(page):
    html, base = page["html"], page["path"].parent
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and not [r for r in refs if re.match(r"[a-z]+:|//", r)]  # no http(s):, no CDN, no data: needed
    assert "<link" not in html and "@import" not in html and "url(" not in html
    for ref in refs:
        target = (base / ref).resolve()
        assert target.is_file() and (base / "cams").resolve() in target.parents, ref
    assert len(re.findall(r'<img class="cam"', html)) == (page["preds"]["gradcam"] != "").sum() == 3


def test_exams_are_grouped_sorted_by_p_dense_and_called_by_dens_infer_s_exam_rule(page):
    html = page["html"]
    rows = re.findall(
        r'<tr class="(dense)?" data-p-dense="([0-9.-]+)"><td class="id">(.*?)</td>'
        r'<td class="call" title="([^"]*)">([A-D])</td>',
        html,
    )
    # Exam 1: B breasts of mean p_dense 0.205 (left) and 0.225 (right), the denser one calls. Exam 2: a D
    # left breast beside a right one whose C and B views average to B; its densest view is not the call.
    assert [float(p) for _, p, *_ in rows] == [0.95, 0.7, 0.225]  # descending
    assert [call for *_, call in rows] == ["D", "C", "B"]
    assert {source for *_, source, _ in rows} == {"dens-infer&#x27;s exam rule, from preds.csv"}
    assert "densest image" not in html
    assert "A2" in rows[0][2] and "study_uid" not in rows[0][2]  # exam 2 grouped by its accession
    other = html.split('data-p-dense="0.950000"')[1].split("</tr>")[0].split("<td>")[-1]
    assert "XCCL" in other  # a view outside the four slots goes to "other"
    assert "Files without a call (1)" in html and "corrupt_pixel_data" in html


def test_exam_calls_come_from_preds_exam_csv_where_it_is_current(page):
    calls = exams.exam_calls(page["preds"]).set_index(exams.EXAM)
    calls.loc["study_uid:1.2.1", [labels.DENSITY, labels.P_DENSE]] = ["C", "0.810000"]
    calls.loc["study_uid:1.2.3", [labels.DENSITY, exams.N_IMAGES]] = ["A", "5"]  # stale: other images
    calls = calls.drop(index="accession:A2").reset_index()  # lacks an exam
    path = report.write_report(page["preds"], page["preds_csv"], page["thumbs"], exam_calls=calls)
    html = path.read_text()
    assert 'data-p-dense="0.810000"' in html and 'title="preds.exam.csv">C<' in html
    rule = "dens-infer&#x27;s exam rule, from preds.csv"
    assert f'title="{rule}">D<' in html and f'title="{rule}">C<' in html and ">A<" not in html


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@needs_chromium
def test_page_renders_in_headless_chromium(page, tmp_path):
    shot = tmp_path / "shot.png"
    _chromium(["--window-size=1400,1000", f"--screenshot={shot}", page["path"].as_uri()], tmp_path)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[:2] == (1000, 1400)
    assert pixels.std() > 20  # not a blank page
    # The overlays' turbo colours are on screen: the images loaded (file:// under the page's CSP).
    hsv = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)
    assert ((hsv[..., 1] > 150) & (hsv[..., 2] > 150)).sum() > 2000


@needs_chromium
def test_hostile_values_stay_text_and_sorting_works_in_chromium(page, tmp_path):
    html = page["html"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", html).group(1)
    # Click the sort button from a second script carrying the page's nonce, then read the live DOM.
    clicked = page["path"].with_name("clicked.html")
    clicked.write_text(
        html.replace("</body>", f'<script nonce="{nonce}">document.getElementById("sort").click();</script></body>')
    )
    dom = _chromium(["--dump-dom", clicked.as_uri()], tmp_path).stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # shown as text
    assert len(re.findall(r"<script\b", dom)) == 2  # ours only: nothing injected became an element
    order = [float(p) for p in re.findall(r'data-p-dense="([0-9.-]+)"', dom)]
    assert order == sorted(order) and len(order) == 3, order
    assert "lowest first" in dom
