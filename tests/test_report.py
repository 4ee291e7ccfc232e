"""The review page and its pictures: overlays on one page-wide scale, masked to the breast, labelled, in
PACS orientation; exams grouped, sorted by p_dense and filtered; header values shown as text (never markup);
the page carries its images and runs offline under a strict CSP; it renders and works in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest

from chromium import CHROMIUM, MISSING, Browser
from dens import exams, labels
from dens.gradcam import assign_stems
from dens.review import display, report, study
from dens.review.views import page_scale, view_label, write_view_files
from dens.route.config import PreprocessConfig

HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_ATTR = 'x" onerror="alert(2)'
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=MISSING)
SHAPE = (192, 96)  # display images of the fixture: height, width


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


def canonical_breast(seed: int) -> np.ndarray:
    """A canonical-looking image: a half-disc of tissue against the left edge (the chest wall), black
    elsewhere, brighter towards the chest wall."""
    h, w = SHAPE
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (h * 0.45)) ** 2 + (xx / (w * 0.85)) ** 2 < 1
    noise = np.random.default_rng(seed).normal(0, 12, SHAPE)
    return np.where(inside, np.clip(170 - 60 * xx / w + noise, 30, 255), 0).astype(np.uint8)


def blob(centre: tuple[int, int], peak: float) -> np.ndarray:
    """A map at a model's input size (half the display's): a Gaussian of height ``peak`` at ``centre``
    (display pixels, canonical orientation)."""
    h, w = SHAPE[0] // 2, SHAPE[1] // 2
    yy, xx = np.mgrid[:h, :w]
    return (peak * np.exp(-((yy - centre[0] / 2) ** 2 + (xx - centre[1] / 2) ** 2) / 60)).astype(np.float32)


@pytest.fixture
def page(tmp_path) -> dict:
    """Three exams (one keyed by accession only and asymmetric, one with hostile header values), a failed
    file of exam 1 and an unreadable file with a hostile path; pictures made as dens-gradcam makes them,
    the flagged views' maps on one scale whose maximum is exam 2's L CC map, and each on its own scale; the
    study date and age of exam 1 and, hostile, of exam 3, as their headers would give them."""
    rows = [_row(1, lat, view, "B", 0.2 + 0.01 * k) for k, (lat, view) in enumerate(exams.STANDARD_VIEWS)]
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
    failed = {labels.STATUS: "error", labels.REASON: "corrupt_pixel_data", labels.P_DENSE: "", labels.DENSITY: ""}
    rows.append({**_row(1, "R", "CC", "", 0.0), **failed, labels.PATH: "/data/1/RCC-again.dcm"})
    rows.append({**_row(4, "L", "CC", "", 0.0), **failed, labels.PATH: f"/data/{HOSTILE_NAME}/{HOSTILE_ATTR}.dcm"})
    preds = pd.DataFrame(rows)
    out = tmp_path / "cams"
    stems = assign_stems(preds[labels.SOP_UID].tolist(), preds[labels.PATH].tolist())
    peaks = {4: 2.0, 5: 1.0, 7: 0.5}  # raw map maxima of the flagged rows, in "the model's units"
    page_max = max(peaks.values())
    cfg = PreprocessConfig(height=SHAPE[0] // 2, width=SHAPE[1] // 2)
    views = {}
    for i, r in preds.iterrows():
        if r[labels.STATUS] != "ok":
            continue
        shown = display.as_displayed(canonical_breast(i), r[labels.LATERALITY], cfg)
        cam = own = None
        if i in peaks:
            cam = display.as_displayed(blob((60, 25), peaks[i]) / page_max, r[labels.LATERALITY], cfg)
            own_cam = display.as_displayed(blob((60, 25), peaks[i]) / peaks[i], r[labels.LATERALITY], cfg)
            own = (own_cam, view_label(r.to_dict(), own_peak=peaks[i]))
        views[i] = write_view_files(out, stems[i], shown, cam, view_label(r.to_dict()), cfg.version, own=own)
    overlays = {i: v.overlay for i, v in views.items() if v.overlay}
    preds["gradcam"] = [f"cams/{overlays[i].name}" if i in overlays else "" for i in range(len(preds))]
    preds_csv = tmp_path / "preds.csv"
    preds.to_csv(preds_csv, index=False)
    path = report.write_report(
        preds,
        preds_csv,
        {i: v.thumbnail for i, v in views.items()},
        overlays=overlays,
        overlay_thumbs={i: v.overlay_thumbnail for i, v in views.items() if v.overlay_thumbnail},
        own_overlays={i: v.own_overlay for i, v in views.items() if v.own_overlay},
        own_overlay_thumbs={i: v.own_overlay_thumbnail for i, v in views.items() if v.own_overlay_thumbnail},
        scale=page_scale(page_max, len(peaks)),
        studies={
            "study_uid:1.2.1": {study.STUDY_DATE: "2023-04-05", study.AGE: "52"},
            "study_uid:1.2.3": {study.STUDY_DATE: HOSTILE_NAME, study.AGE: HOSTILE_ATTR},
        },
    )
    return {"path": path, "html": path.read_text(), "preds": preds, "preds_csv": preds_csv, "views": views}


# --- pictures -------------------------------------------------------------------------------------


def test_display_size_is_the_model_canvas_scaled_to_512_1024_pixels():
    assert display.display_config(PreprocessConfig()).shape == (736, 352)  # already in range: the same
    assert display.display_config(PreprocessConfig(size=64)).shape == (512, 512)
    assert display.display_config(PreprocessConfig(size=128, version=1)).shape == (512, 512)
    assert display.display_config(PreprocessConfig(height=300, width=150)).shape == (600, 300)
    assert display.display_config(PreprocessConfig(size=2048)).shape == (2048, 2048)  # never shrunk
    scaled = display.display_config(PreprocessConfig(size=128, version=1))
    assert scaled.version == 1 and scaled.crop_margin == PreprocessConfig(size=128, version=1).crop_margin


def test_right_breasts_are_mirrored_back_to_pacs_orientation():
    canonical = canonical_breast(0)  # chest wall on the left, as the model reads every image
    cfg = PreprocessConfig()
    right = display.as_displayed(canonical, "R", cfg)
    np.testing.assert_array_equal(right, canonical[:, ::-1])
    assert right[:, -10:].mean() > right[:, :10].mean()  # chest wall (the tissue's base) on the right
    np.testing.assert_array_equal(display.as_displayed(canonical, "L", cfg), canonical)
    np.testing.assert_array_equal(display.as_displayed(canonical, "", cfg), canonical)
    unoriented = PreprocessConfig(orient=False)  # the canonical image kept the file's own orientation
    np.testing.assert_array_equal(display.as_displayed(canonical, "R", unoriented), canonical)


def test_overlay_is_on_the_page_scale_masked_to_the_breast_labelled_with_a_colour_bar(page):
    preds, views = page["preds"], page["views"]
    strong, weak = cv2.imread(str(views[4].overlay)), cv2.imread(str(views[7].overlay))
    assert strong.shape == weak.shape and strong.shape[1] > 2 * SHAPE[1]  # image, overlay and the bar
    header = strong.shape[0] - SHAPE[0]
    assert header > 20 and strong[:header].std() > 5  # text in the header
    # Its label names side, view, class and p (the figure's own text, checked through view_label).
    label = view_label(preds.loc[4].to_dict())
    assert label[0].startswith("L CC") and "called D" in label[1] and "p_D" in label[1] and "p_dense 0.95" in label[1]

    def overlay_part(figure: np.ndarray) -> np.ndarray:
        body = figure[header:]
        gap = (body.shape[1] - 2 * SHAPE[1] - _bar_width(body)) // 2
        return body[:, SHAPE[1] + gap : 2 * SHAPE[1] + gap]

    # Exam 2's L CC holds the page's maximum (peak 2.0 -> 1.0); exam 3's L CC peaks at 0.5 -> 0.25: on one
    # scale the weaker map is visibly another colour at its peak, not the same yellow.
    y, x = 60, 25
    hot, cool = overlay_part(strong)[y, x].astype(int), overlay_part(weak)[y, x].astype(int)
    grey_hot = canonical_breast(4)[y, x]
    viridis = display.colour(np.array([[1.0, 0.25]]))[0].astype(int)

    def blended(grey: int, rgb: np.ndarray, value: float) -> np.ndarray:
        alpha = display.ALPHA_LOW + display.ALPHA_GAIN * value
        return grey * (1 - alpha) + rgb * alpha

    assert np.abs(hot - blended(grey_hot, viridis[0], 1.0)).max() <= 3
    assert np.abs(cool - blended(canonical_breast(7)[y, x], viridis[1], 0.25)).max() <= 3
    # Outside the breast nothing is coloured: the background stays the image's black.
    assert overlay_part(strong)[5, SHAPE[1] - 5].max() <= 2


def test_a_weak_map_is_seen_in_full_on_its_own_scale(page):
    """Exam 3's L CC map peaks at a quarter of the page's largest value: on the page's scale a dim tint, on its
    own scale as bright as the strongest map, labelled so."""
    views = page["views"]
    weak, own = cv2.imread(str(views[7].overlay)), cv2.imread(str(views[7].own_overlay))
    assert own.shape == weak.shape and views[7].own_overlay.parent.name == "own-scale"
    header = own.shape[0] - SHAPE[0]
    gap = (own.shape[1] - 2 * SHAPE[1] - _bar_width(own[header:])) // 2
    y, x = 60, 25
    grey = canonical_breast(7)[y, x]
    viridis = display.colour(np.array([[1.0, 0.25]]))[0].astype(int)
    alpha = display.ALPHA_LOW + display.ALPHA_GAIN
    got = own[header:, SHAPE[1] + gap : 2 * SHAPE[1] + gap][y, x].astype(int)
    assert np.abs(got - (grey * (1 - alpha) + viridis[0] * alpha)).max() <= 3  # 1.0 on its own scale
    label = view_label(page["preds"].loc[7].to_dict(), own_peak=0.5)
    assert "1 = this map's own largest value (0.5)" in label[2]
    assert views[4].own_overlay_thumbnail.parent.name == "own-scale" and views[0].own_overlay is None


def _bar_width(body: np.ndarray) -> int:
    """The colour bar panel's width: the columns right of the overlay that are not the image."""
    h = body.shape[0]
    pad, bar_w = max(4, h // 48), max(10, h // 40)
    text_w = cv2.getTextSize("0.5", cv2.FONT_HERSHEY_SIMPLEX, *display._text_scale(h))[0][0]
    return 3 * pad + bar_w + text_w


def test_right_breast_overlay_is_mirrored_with_its_image(page):
    r_mlo = page["views"][5]  # exam 2, R MLO: map at (60, 25) in canonical, so at width - 25 as displayed
    thumb = cv2.imread(str(r_mlo.overlay_thumbnail))
    image = cv2.imread(str(page["views"][5].thumbnail), cv2.IMREAD_GRAYSCALE)
    assert image[:, -10:].mean() > image[:, :10].mean()  # chest wall on the right
    colourful = np.abs(thumb.astype(int) - thumb.mean(axis=2, keepdims=True)).sum(axis=2)
    peak = np.unravel_index(colourful.argmax(), colourful.shape)
    assert peak[1] > thumb.shape[1] / 2  # the map's hot spot moved with the chest wall


# --- the page -------------------------------------------------------------------------------------


def test_hostile_header_values_are_escaped_everywhere(page):
    html = page["html"]
    assert HOSTILE_NAME not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'onerror="' not in html and "x&quot; onerror=&quot;alert(2)" in html
    assert len(re.findall(r"<script\b", html)) == 1  # ours, and it carries the CSP nonce
    nonce = re.search(r"script-src 'nonce-([^']+)'", html).group(1)
    assert f'<script nonce="{nonce}">' in html


def test_page_carries_its_images_and_needs_nothing_else(page, tmp_path):
    html = page["html"]
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html).group(1)
    assert "default-src 'none'" in csp and "img-src data:;" in csp and "script-src 'nonce-" in csp
    refs = re.findall(r'(?:src|href|data-full)="([^"]*)"', html)
    assert refs and all(r.startswith("data:image/webp;base64,") for r in refs)
    text = re.sub(r"data:image/webp;base64,[A-Za-z0-9+/=]+", "", html)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert not re.search(r"https?:|//\w|file:", text)
    for ref in refs:  # every embedded image decodes
        data = np.frombuffer(base64.b64decode(ref.split(",", 1)[1]), np.uint8)
        assert cv2.imdecode(data, cv2.IMREAD_UNCHANGED) is not None
    assert all('loading="lazy"' in tag for tag in re.findall(r"<img [^>]*>", html.split('id="full"')[0]))
    assert len(re.findall(r'<img class="cam"', html)) == (page["preds"]["gradcam"] != "").sum() == 3
    size = re.search(r"this page (\d+) kB with its images", html)  # it states its own size
    assert size and abs(int(size.group(1)) - len(html.encode()) / 1024) < 1
    # Moved alone (the Grad-CAM folder left behind), it still has every image.
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    page["path"].rename(moved)
    assert moved.read_text() == html


def test_exams_are_grouped_sorted_by_p_dense_hung_as_pacs_and_called_by_the_exam_rule(page):
    html = page["html"]
    rows = re.findall(
        r'<tr class="exam[^"]*" data-exam="([^"]*)".*?data-call="([A-D])" data-p-dense="([0-9.-]+)"', html
    )
    # Exam 1: B breasts of mean p_dense 0.205 (left) and 0.225 (right), the denser one calls. Exam 2: a D
    # left breast beside a right one whose C and B views average to B; its densest view is not the call.
    assert [float(p) for *_, p in rows] == [0.95, 0.7, 0.225]  # descending
    assert [call for _, call, _ in rows] == ["D", "C", "B"]
    assert rows[0][0] == "accession:A2"  # exam 2 keyed by its accession, as preds.exam.csv keys it
    assert html.count("dens-infer&#x27;s exam rule, from preds.csv") == 3
    head = re.search(r"<thead>(.*?)</thead>", html, re.S).group(1)
    assert re.findall(r"<th>([RL] (?:CC|MLO))</th>", head) == ["R CC", "L CC", "R MLO", "L MLO"]
    exam1 = html.split('data-exam="study_uid:1.2.1"')[1].split("</tr>")[0]
    cells = re.findall(r'<td class="view">(.*?)</td>', exam1, re.S)
    assert [re.search(r"<figcaption>(\w \w+):", c).group(1) for c in cells[:4]] == ["R CC", "L CC", "R MLO", "L MLO"]
    other = html.split('data-exam="accession:A2"')[1].split("</tr>")[0]
    assert "XCCL" in re.findall(r'<td class="view">(.*?)</td>', other, re.S)[4]  # a view outside the four: "other"
    assert "Files without a call (2)" in html and "corrupt_pixel_data" in html
    assert "chest wall on the right" in html and "one scale for the whole page" in html


def test_exam_rows_carry_the_filters_tags(page):
    tags = dict(re.findall(r'data-exam="([^"]*)".*?data-tags="([^"]*)"', page["html"]))
    assert set(tags["accession:A2"].split()) == {"flagged", "dense", "asymmetric", "incomplete", "unreviewed"}
    assert set(tags["study_uid:1.2.3"].split()) == {"flagged", "dense", "incomplete", "unreviewed"}
    assert set(tags["study_uid:1.2.1"].split()) == {"errors", "unreviewed"}  # four views, a failed fifth file
    assert "missing L-MLO, R-CC<" in page["html"] and "1 file without a call" in page["html"]


def test_an_incomplete_exam_s_call_is_shown_with_what_is_missing(page):
    """Exam 3 has a left CC only, exam 2 lacks L-MLO and R-CC: each shows its call, and under it, in the SR's
    words, the side or views it was called without."""
    html = page["html"]
    cells = dict(re.findall(r'data-exam="([^"]*)".*?<td class="call"[^>]*>(.*?)</td>', html, re.S))
    assert cells["study_uid:1.2.3"].startswith("C") and cells["accession:A2"].startswith("D")
    assert exams.describe_missing(["L-MLO", "R-CC", "R-MLO"]) == "no right breast image; missing L-MLO"
    assert "no right breast image; missing L-MLO" in cells["study_uid:1.2.3"]
    assert "missing L-MLO, R-CC" in cells["accession:A2"]
    assert "missing" not in cells["study_uid:1.2.1"]  # complete


def test_exam_rows_show_the_study_date_and_the_woman_s_age(page):
    html = page["html"]
    exam1 = html.split('data-exam="study_uid:1.2.1"')[1].split("</tr>")[0]
    assert '<span class="k">study date</span> 2023-04-05' in exam1 and '<span class="k">age</span> 52' in exam1
    exam2 = html.split('data-exam="accession:A2"')[1].split("</tr>")[0]
    assert "study date" not in exam2 and '"k">age<' not in exam2  # its headers gave neither: nothing shown


def test_study_date_and_age_come_from_the_header():
    from pydicom.dataset import Dataset

    def header(**values) -> Dataset:
        ds = Dataset()
        with warnings.catch_warnings():  # some values are malformed on purpose, as a header's can be
            warnings.simplefilter("ignore", UserWarning)
            for keyword, value in values.items():
                setattr(ds, keyword, value)
        return ds

    date, age = study.STUDY_DATE, study.AGE
    assert study.facts(header(StudyDate="20230405", PatientAge="052Y")) == {date: "2023-04-05", age: "52"}
    # No PatientAge: her age on the study date, from her birth date (the day before a birthday, a year less).
    assert study.facts(header(StudyDate="20230405", PatientBirthDate="19700615")) == {date: "2023-04-05", age: "52"}
    assert study.facts(header(StudyDate="20230405", PatientBirthDate="19700405"))[age] == "53"
    assert study.facts(header(PatientAge="006M")) == {age: "6 months"}
    assert study.facts(header(PatientBirthDate="19700615")) == {}  # no study date: no age (never today's)
    assert study.facts(header(StudyDate="2023", PatientAge="52")) == {date: "2023", age: "52"}  # as written
    assert study.facts(header()) == {}


def test_exam_calls_come_from_preds_exam_csv_where_it_is_current(page):
    calls = exams.exam_calls(page["preds"]).set_index(exams.EXAM)
    calls.loc["study_uid:1.2.1", [labels.DENSITY, labels.P_DENSE]] = ["C", "0.810000"]
    calls.loc["study_uid:1.2.3", [labels.DENSITY, exams.N_IMAGES]] = ["A", "5"]  # stale: other images
    calls = calls.drop(index="accession:A2").reset_index()  # lacks an exam
    path = report.write_report(page["preds"], page["preds_csv"], {}, exam_calls=calls)
    html = path.read_text()
    assert 'data-call="C" data-p-dense="0.810000"' in html and 'title="preds.exam.csv">C<' in html
    rule = "dens-infer&#x27;s exam rule, from preds.csv"
    assert f'title="{rule}">D<' in html and f'title="{rule}">C<' in html and 'data-call="A"' not in html


def test_the_verdict_store_is_keyed_by_the_run_s_calls(page):
    run = re.search(r'data-run="([0-9a-f]{16})"', page["html"]).group(1)
    again = report.write_report(page["preds"], page["preds_csv"], {}).read_text()
    assert re.search(r'data-run="([0-9a-f]{16})"', again).group(1) == run  # the same calls: the same verdicts
    other = page["preds"].copy()
    other.loc[0:3, labels.DENSITY] = "A"
    other.loc[0:3, [f"p_{c}" for c in labels.CLASSES]] = ["0.7", "0.1", "0.1", "0.1"]
    changed = report.write_report(other, page["preds_csv"], {}).read_text()
    assert re.search(r'data-run="([0-9a-f]{16})"', changed).group(1) != run


# --- in Chromium ----------------------------------------------------------------------------------


@needs_chromium
def test_page_renders_its_rows_and_images_in_chromium(page, tmp_path):
    with Browser(tmp_path / "profile") as browser:
        browser.open(page["path"].as_uri())
        assert browser.evaluate("document.querySelectorAll('#exams tbody tr:not([hidden])').length") == 3
        browser.click('tr[data-exam="accession:A2"] img.cam')  # scrolls the first row into view
        loaded = browser.evaluate(
            "Array.from(document.querySelectorAll('#exams img')).filter(i => i.complete && i.naturalWidth > 0).length"
        )
        assert loaded >= 6  # lazy images in view loaded under the CSP (data: only)
        assert browser.evaluate("document.getElementById('full').hidden") is False  # the full-size figure
        assert browser.evaluate("document.querySelector('#full img').naturalWidth") > 2 * SHAPE[1]
        browser.click("#full")
        assert browser.evaluate("document.getElementById('full').hidden") is True
        browser.click('tr[data-exam="study_uid:1.2.1"] figure img')  # a view without a map: larger too
        assert browser.evaluate("document.querySelector('#full img').src") == browser.evaluate(
            "document.querySelector('tr[data-exam=\"study_uid:1.2.1\"] figure img').src"
        )
        browser.click("#full")
        browser.evaluate("window.scrollTo(0, 0)")
        shot = browser.screenshot(tmp_path / "shot.png")
    pixels = cv2.imread(str(shot))
    assert pixels is not None and pixels.shape[:2] == (1000, 1400) and pixels.std() > 20
    hsv = cv2.cvtColor(pixels, cv2.COLOR_BGR2HSV)
    assert ((hsv[..., 1] > 120) & (hsv[..., 2] > 120)).sum() > 200  # the maps' colours are on screen


@needs_chromium
def test_hostile_values_stay_text_and_sorting_and_filters_work_in_chromium(page, tmp_path):
    with Browser(tmp_path / "profile") as browser:
        browser.open(page["path"].as_uri())
        assert browser.evaluate("document.querySelectorAll('script').length") == 1  # nothing injected
        assert HOSTILE_NAME in browser.evaluate("document.querySelector('#exams').innerText")  # shown as text
        browser.click("#sort")
        order = browser.evaluate("Array.from(document.querySelectorAll('#exams tbody tr')).map(r => r.dataset.pDense)")
        assert [float(p) for p in order] == sorted(float(p) for p in order) and len(order) == 3
        visible = "Array.from(document.querySelectorAll('#exams tbody tr:not([hidden])')).map(r => r.dataset.exam)"
        browser.click('button[data-filter="asymmetric"]')
        assert browser.evaluate(visible) == ["accession:A2"]
        browser.click('button[data-filter="asymmetric"]')
        browser.click('button[data-filter="errors"]')
        assert browser.evaluate(visible) == ["study_uid:1.2.1"]
        browser.click('button[data-filter="errors"]')
        browser.click('button[data-filter="dense"]')
        browser.click('button[data-filter="incomplete"]')
        assert sorted(browser.evaluate(visible)) == ["accession:A2", "study_uid:1.2.3"]
        assert "2 of 3 exams shown" in browser.evaluate("document.getElementById('shown').textContent")


def _press(browser: Browser, key: str) -> None:
    """A key pressed and released, as a person's keyboard sends it (DevTools input events, not a script's)."""
    arrows = {"ArrowDown": 40, "ArrowUp": 38}
    down = {"key": key, "code": key, "windowsVirtualKeyCode": arrows[key]} if key in arrows else {}
    down = down or {"key": key, "code": f"Key{key.upper()}", "text": key, "windowsVirtualKeyCode": ord(key.upper())}
    browser.call("Input.dispatchKeyEvent", type="keyDown", **down)
    browser.call("Input.dispatchKeyEvent", type="keyUp", **{k: v for k, v in down.items() if k != "text"})


REVIEWER = "Dr A. Reader"


@needs_chromium
def test_a_verdict_records_who_gave_it_and_needs_a_name_in_chromium(page, tmp_path):
    row = 'tr[data-exam="study_uid:1.2.1"]'
    reviewed = "Array.from(document.querySelectorAll('#exams tr.reviewed')).map(r => r.dataset.exam)"
    with Browser(tmp_path / "profile") as browser:
        browser.open(page["path"].as_uri())
        browser.click(f'{row} button[data-verdict="agree"]')
        assert browser.evaluate(reviewed) == []  # no name yet: nothing recorded, the name field asks for one
        assert browser.evaluate("document.activeElement.id") == "reviewer"
        assert "your name" in browser.evaluate("document.getElementById('reviewed').textContent")
        browser.call("Input.insertText", text=REVIEWER)
        browser.click(f'{row} button[data-verdict="agree"]')
        assert browser.evaluate(reviewed) == ["study_uid:1.2.1"]
        stored = "JSON.parse(localStorage.getItem('dens-verdicts:' + document.body.dataset.run))"
        assert browser.evaluate(f"{stored}['study_uid:1.2.1'].by") == REVIEWER
        browser.reload()  # the name is kept by the browser, for this page and the next
        assert browser.evaluate("document.getElementById('reviewer').value") == REVIEWER


@needs_chromium
def test_keyboard_moves_between_exams_and_a_to_d_set_the_verdict_in_chromium(page, tmp_path):
    current = "(document.querySelector('#exams tr.current') || {dataset: {}}).dataset.exam || null"
    stored = "JSON.parse(localStorage.getItem('dens-verdicts:' + document.body.dataset.run) || '{}')"
    with Browser(tmp_path / "profile") as browser:
        browser.open(page["path"].as_uri())
        browser.click("#reviewer")
        browser.call("Input.insertText", text=REVIEWER)
        browser.evaluate("document.activeElement.blur()")
        assert browser.evaluate(current) is None
        moves = [("j", "accession:A2"), ("j", "study_uid:1.2.3"), ("ArrowDown", "study_uid:1.2.1")]
        moves += [("j", "study_uid:1.2.1"), ("k", "study_uid:1.2.3"), ("ArrowUp", "accession:A2")]
        for key, exam in moves:  # in the order shown (p_dense, highest first); the ends hold
            _press(browser, key)
            assert browser.evaluate(current) == exam, key
        _press(browser, "c")  # exam 2 is called D: C is a disagreement, with C the category
        assert browser.evaluate(f"{stored}['accession:A2']") | {"at": ""} == {
            "verdict": "disagree",
            "density": "C",
            "by": REVIEWER,
            "at": "",
        }
        _press(browser, "d")
        assert browser.evaluate(f"{stored}['accession:A2'].verdict") == "agree"
        assert browser.evaluate("document.querySelectorAll('#exams tr.reviewed').length") == 1
        browser.click('button[data-filter="errors"]')  # only exam 1 shown: the keys visit it alone
        for key in ("j", "j", "k"):
            _press(browser, key)
            assert browser.evaluate(current) == "study_uid:1.2.1"
        end = "(i => { i.focus(); i.setSelectionRange(i.value.length, i.value.length); })"
        browser.evaluate(f"{end}(document.getElementById('reviewer'))")
        _press(browser, "a")  # typing a name is not a command
        assert browser.evaluate(f"{stored}['study_uid:1.2.1']") is None
        assert browser.evaluate("document.getElementById('reviewer').value") == REVIEWER + "a"
    notes = re.search(r'<div class="notes">(.*?)</div>', page["html"], re.S).group(1)
    assert "Keyboard" in notes and "next exam" in notes and "A-D" in notes  # documented on the page


@needs_chromium
def test_each_map_on_its_own_scale_is_a_toggle_in_chromium(page, tmp_path):
    views = page["views"]
    assert page["html"].count('data-own-full="data:image/webp;base64,') == 3
    assert "each map on its own scale" in page["html"]
    own, shared = (
        display.data_uri(path.read_bytes()) for path in (views[7].own_overlay_thumbnail, views[7].overlay_thumbnail)
    )
    cam = json.dumps('tr[data-exam="study_uid:1.2.3"] img.cam')
    src, pressed = f"document.querySelector({cam}).src", "document.getElementById('scale').getAttribute('aria-pressed')"
    with Browser(tmp_path / "profile") as browser:
        browser.open(page["path"].as_uri())
        assert browser.evaluate(src) == shared and browser.evaluate(pressed) == "false"  # one scale by default
        browser.click("#scale")
        assert browser.evaluate(src) == own and browser.evaluate(pressed) == "true"
        browser.click('tr[data-exam="study_uid:1.2.3"] img.cam')  # the full-size figure follows
        assert browser.evaluate("document.querySelector('#full img').src") == browser.evaluate(
            f"document.querySelector({cam}).dataset.ownFull"
        )
        browser.click("#full")
        browser.click("#scale")
        assert browser.evaluate(src) == shared and browser.evaluate(pressed) == "false"
