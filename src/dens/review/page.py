"""The review page's static parts: its template (with the style sheet) and its one inline script.

The script keeps the verdicts in localStorage under the page's run, each with the name of the reviewer who gave it
(kept in localStorage too, for every page), filters and sorts the rows, moves between exams and sets verdicts from
the keyboard, opens a flagged view's full-size figure, switches the maps between the page's one scale and each
map's own, and exports the verdicts as a CSV (a Blob and a download link: no server).
:mod:`dens.review.report` fills the template; every value it puts in is escaped there. The export's columns
are defined here, beside the script that writes them, for dens-verdicts (:mod:`dens.verdicts`) to read.
"""

from dens import exams

# The verdicts export: one row per reviewed exam, in these columns (the script's `values` below), each verdict
# AGREE or DISAGREE; REVIEWER is the name of who gave it (exports from before it existed lack the column).
MODEL_DENSITY, MODEL_P_DENSE, RUN = "model_density", "model_p_dense", "run"
VERDICT, REVIEWER_DENSITY, REVIEWED_AT, REVIEWER = "verdict", "reviewer_density", "reviewed_at", "reviewer"
VERDICT_COLUMNS = (
    exams.EXAM,
    *exams.IDENTITY,
    MODEL_DENSITY,
    MODEL_P_DENSE,
    VERDICT,
    REVIEWER_DENSITY,
    REVIEWED_AT,
    REVIEWER,
    RUN,
)
AGREE, DISAGREE = "agree", "disagree"

SCRIPT = """
"use strict";
const table = document.getElementById("exams"), body = table.tBodies[0];
const rows = Array.from(body.rows), RUN = document.body.dataset.run, KEY = "dens-verdicts:" + RUN;
const COLUMNS = JSON.parse(document.body.dataset.columns);
let verdicts = {};
try { verdicts = JSON.parse(localStorage.getItem(KEY) || "{}") || {}; } catch (e) { verdicts = {}; }
let stored = true;  // false where this browser keeps nothing for a page opened from disk (the status says so)
const store = () => {
  try { localStorage.setItem(KEY, JSON.stringify(verdicts)); stored = true; } catch (e) { stored = false; }
};

function paint(row) {
  const v = verdicts[row.dataset.exam];
  for (const b of row.querySelectorAll("button[data-verdict]"))
    b.setAttribute("aria-pressed", String(!!v && v.verdict === b.dataset.verdict));
  for (const b of row.querySelectorAll("button[data-category]"))
    b.setAttribute("aria-pressed", String(!!v && v.density === b.dataset.category));
  const tags = row.dataset.tags.split(" ").filter(t => t && t !== "unreviewed");
  if (!v) tags.push("unreviewed");
  row.dataset.tags = tags.join(" ");
  row.classList.toggle("reviewed", !!v);
  row.classList.toggle("disagree", !!v && v.verdict === "disagree");
}

const active = new Set();
function refresh() {
  let shown = 0, reviewed = 0;
  for (const row of rows) {
    const tags = row.dataset.tags.split(" ");
    const visible = [...active].every(t => tags.includes(t));
    row.hidden = !visible;
    shown += visible;
    reviewed += !!verdicts[row.dataset.exam];
  }
  document.getElementById("shown").textContent = shown + " of " + rows.length + " exams shown";
  document.getElementById("reviewed").textContent = askName ? "enter your name first (Reviewer): each verdict " +
    "records who gave it" : reviewed + " of " + rows.length + " reviewed" +
    (stored ? "" : " (this browser does not keep them: export before closing the page)");
  document.querySelector('button[data-filter="unreviewed"] .n').textContent = rows.length - reviewed;
}

// Who reviews: a verdict records the name in the Reviewer field, which the browser keeps for every page.
const NAME_KEY = "dens-reviewer", nameBox = document.getElementById("reviewer");
try { nameBox.value = localStorage.getItem(NAME_KEY) || ""; } catch (e) { /* nothing kept: typed each time */ }
let askName = false;
nameBox.addEventListener("input", () => {
  try { localStorage.setItem(NAME_KEY, nameBox.value.trim()); } catch (e) { /* kept for this visit only */ }
  askName = false; nameBox.classList.remove("ask"); refresh();
});
function reviewer() {
  const name = nameBox.value.trim();
  if (!name) { askName = true; nameBox.classList.add("ask"); nameBox.focus(); refresh(); }
  return name;
}

// A verdict from a button or a key: {verdict: "agree" | "disagree"} or {category: "A".."D"}.
function mark(row, what) {
  const by = reviewer();
  if (!by) return;
  const exam = row.dataset.exam, call = row.dataset.call, old = verdicts[exam] || {};
  let v;
  if (what.verdict === "agree") v = {verdict: "agree", density: call};
  else if (what.verdict === "disagree")
    v = {verdict: "disagree", density: old.verdict === "disagree" ? old.density : ""};
  else v = {verdict: what.category === call ? "agree" : "disagree", density: what.category};
  v.at = new Date().toISOString();
  v.by = by;
  verdicts[exam] = v;
  store(); paint(row); refresh();
}

body.addEventListener("click", event => {
  const row = event.target.closest("tr");
  if (row) setCurrent(row, false);
  const image = event.target.closest("figure img");
  if (image) { showFull(image); return; }
  const button = event.target.closest("button");
  if (!button) return;
  if (button.dataset.verdict) mark(row, {verdict: button.dataset.verdict});
  else if (button.dataset.category) mark(row, {category: button.dataset.category});
});

// The keyboard: J or Down the next exam shown, K or Up the previous one, A-D the category for it.
let current = null;
function setCurrent(row, scroll = true) {
  if (current) current.classList.remove("current");
  current = row;
  if (!row) return;
  row.classList.add("current");
  if (scroll) row.scrollIntoView({block: "nearest"});
}
function move(step) {
  const shown = rows.filter(row => !row.hidden);
  if (!shown.length) return;
  const at = shown.indexOf(current);
  setCurrent(shown[at < 0 ? (step > 0 ? 0 : shown.length - 1) : Math.min(shown.length - 1, Math.max(0, at + step))]);
}
document.addEventListener("keydown", event => {
  if (event.key === "Escape") { box.click(); return; }
  if (event.ctrlKey || event.metaKey || event.altKey || !box.hidden) return;
  if (event.target.closest && event.target.closest("input, textarea, select")) return;  // typing, not a command
  const key = event.key.length === 1 ? event.key.toUpperCase() : event.key;
  if (key === "J" || key === "ArrowDown") move(1);
  else if (key === "K" || key === "ArrowUp") move(-1);
  else if (current && !current.hidden && current.querySelector('button[data-category="' + key + '"]'))
    mark(current, {category: key});
  else return;
  event.preventDefault();
});

for (const button of document.querySelectorAll("button.filter")) {
  button.addEventListener("click", () => {
    const name = button.dataset.filter, on = !active.has(name);
    if (on) active.add(name); else active.delete(name);
    button.setAttribute("aria-pressed", String(on));
    refresh();
  });
}

const sort = document.getElementById("sort");
let descending = true;
sort.addEventListener("click", () => {
  descending = !descending;
  const sign = descending ? -1 : 1;
  rows.sort((a, b) => sign * (parseFloat(a.dataset.pDense) - parseFloat(b.dataset.pDense)));
  for (const row of rows) body.appendChild(row);
  sort.textContent = "p_dense " + (descending ? "\\u2193 (highest first)" : "\\u2191 (lowest first)");
});

const cell = s => '"' + String(s == null ? "" : s).replace(/"/g, '""') + '"';
document.getElementById("export").addEventListener("click", () => {
  const lines = [COLUMNS.join(",")];
  for (const row of rows) {
    const v = verdicts[row.dataset.exam];
    if (!v) continue;
    const d = row.dataset;
    const values = {exam: d.exam, patient_id: d.patientId, accession: d.accession, study_uid: d.studyUid,
      model_density: d.call, model_p_dense: d.pDense, verdict: v.verdict, reviewer_density: v.density,
      reviewed_at: v.at, reviewer: v.by, run: RUN};
    lines.push(COLUMNS.map(c => cell(values[c])).join(","));
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\\r\\n") + "\\r\\n"], {type: "text/csv"}));
  link.download = "verdicts-" + RUN + ".csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
});

const box = document.getElementById("full"), boxImage = box.querySelector("img");
function showFull(image) {
  boxImage.src = image.dataset.full || image.src;
  box.querySelector("p").textContent = image.closest("figure").querySelector("figcaption").textContent;
  box.hidden = false;
}
box.addEventListener("click", () => { box.hidden = true; boxImage.removeAttribute("src"); });

// The maps' scale: the page's one scale (the default: maps compare), or each map's own (a weak map in full).
const scale = document.getElementById("scale");
const cams = Array.from(document.querySelectorAll("img.cam[data-own-full]"));
const shared = new Map(cams.map(image => [image, [image.getAttribute("src"), image.dataset.full]]));
scale.hidden = !cams.length;
scale.addEventListener("click", () => {
  const own = scale.getAttribute("aria-pressed") !== "true";
  for (const image of cams) {
    const [src, full] = own ? [image.dataset.ownSrc, image.dataset.ownFull] : shared.get(image);
    image.src = src;
    image.dataset.full = full;
  }
  scale.setAttribute("aria-pressed", String(own));
  scale.textContent = own ? "Grad-CAM scale: each map its own" : "Grad-CAM scale: one for the page";
});

rows.forEach(paint);
refresh();
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fafafa; }}
h1 {{ font-size: 1.4em; margin: 0 0 .3em; }}
.summary {{ color: #555; margin: 0 0 1em; }}
.card {{ border-left: 4px solid #999; background: #fff; padding: .4em .8em; margin: 0 0 1em; max-width: 70em; }}
.card.warn {{ border-left-color: #c0392b; }}
.card p {{ margin: .2em 0; }}
.card .caveat {{ color: #c0392b; font-weight: bold; }}
.notes {{ max-width: 70em; color: #333; }}
.notes p {{ margin: .3em 0; }}
.bar {{ position: sticky; top: 0; z-index: 2; background: #fafafa; padding: .5em 0; border-bottom: 1px solid #ddd; }}
.bar button {{ font: inherit; margin: 0 .3em .2em 0; }}
.bar .status {{ color: #555; margin-left: 1em; }}
button[aria-pressed="true"] {{ background: #1f5fa8; color: #fff; border: 1px solid #1f5fa8; }}
button.filter .n {{ color: #777; }}
button.filter[aria-pressed="true"] .n {{ color: #dde; }}
table {{ border-collapse: collapse; margin-top: .5em; }}
th, td {{ border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; background: #fff; }}
th {{ background: #eee; }}
td.call {{ font-size: 1.6em; text-align: center; min-width: 3.5em; }}
td.call .p, td.call .sides {{ font-size: .5em; color: #555; }}
tr.dense td.call {{ background: #ffe1cc; font-weight: bold; }}
tr.reviewed td.review {{ background: #e6f4e6; }}
tr.disagree td.review {{ background: #fbe3e3; }}
td.id {{ max-width: 15em; overflow-wrap: anywhere; font-size: .85em; }}
.k {{ color: #888; }}
.badge {{ display: block; margin-top: .3em; padding: 0 .3em; background: #fff3cd; border-radius: 3px; }}
.badge.err {{ background: #f8d7da; }}
td.view {{ text-align: center; }}
figure {{ margin: 0 0 4px; display: inline-block; }}
figure img {{ height: 160px; width: auto; background: #000; display: inline-block; vertical-align: top; }}
figure img {{ cursor: zoom-in; }}
figure img.cam {{ margin-left: 2px; }}
figcaption {{ font-size: .8em; color: #444; }}
.missing {{ width: 80px; height: 160px; background: #333; color: #ccc; font-size: .8em; display: inline-block; }}
td.review button {{ font: inherit; margin: 0 .2em .3em 0; }}
tr.current td {{ box-shadow: inset 0 2px 0 #1f5fa8, inset 0 -2px 0 #1f5fa8; }}
.bar input {{ font: inherit; width: 12em; }}
.bar input.ask {{ outline: 2px solid #c0392b; }}
.categories, .verdict {{ white-space: nowrap; }}
.categories button {{ min-width: 2em; }}
#full {{ position: fixed; inset: 0; background: rgba(0,0,0,.9); z-index: 5; text-align: center; cursor: zoom-out; }}
#full img {{ width: 98vw; height: 92vh; object-fit: contain; margin-top: 1vh; }}
#full p {{ color: #eee; margin: .3em; }}
</style></head><body data-run="{run}" data-columns="{columns}">
<h1>{title}</h1>
<p class="summary">{summary}</p>
{card}
<div class="notes">{conventions}<p><b>Keyboard:</b> <kbd>J</kbd> or <kbd>&#8595;</kbd> the next exam shown,
<kbd>K</kbd> or <kbd>&#8593;</kbd> the previous one (the current exam is outlined; a click makes an exam current);
<kbd>A</kbd>-<kbd>D</kbd> (A-D) your category for it, which is its verdict too (agree when it is the call, else
disagree); <kbd>Esc</kbd> closes a full-size figure. Keys typed in the Reviewer field are only text.</p></div>
<div class="bar"><label>Reviewer: <input id="reviewer" type="text" autocomplete="name"
placeholder="your name" title="Each verdict records who gave it; this browser keeps the name"></label>
<button id="sort" type="button">p_dense &#8595; (highest first)</button>
<span>Show only:</span> {filters}
<button id="scale" type="button" aria-pressed="false"
title="Each map on its own scale (1 = its own largest value): a weak map seen in full, maps no longer compared"
>Grad-CAM scale: one for the page</button>
<button id="export" type="button">Export verdicts (CSV)</button>
<span class="status" id="shown">{exams} exams</span> <span class="status" id="reviewed"></span></div>
<table id="exams"><thead><tr><th>exam</th><th>call</th><th>R CC</th><th>L CC</th><th>R MLO</th><th>L MLO</th>
<th>other</th><th>verdict</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{unusable}
<div id="full" hidden><p></p><img alt="full-size figure"></div>
<script nonce="{nonce}">{script}</script>
</body></html>
"""
