"""The review page's static parts: its template (with the style sheet) and its one inline script.

The script keeps the verdicts in localStorage under the page's run, filters and sorts the rows, opens a
flagged view's full-size figure, and exports the verdicts as a CSV (a Blob and a download link: no server).
:mod:`dens.review.report` fills the template; every value it puts in is escaped there. The export's columns
are defined here, beside the script that writes them, for dens-verdicts (:mod:`dens.verdicts`) to read.
"""

from dens import exams

# The verdicts export: one row per reviewed exam, in these columns (the script's `values` below), each verdict
# AGREE or DISAGREE.
MODEL_DENSITY, MODEL_P_DENSE, RUN = "model_density", "model_p_dense", "run"
VERDICT, REVIEWER_DENSITY, REVIEWED_AT = "verdict", "reviewer_density", "reviewed_at"
VERDICT_COLUMNS = (
    exams.EXAM,
    *exams.IDENTITY,
    MODEL_DENSITY,
    MODEL_P_DENSE,
    VERDICT,
    REVIEWER_DENSITY,
    REVIEWED_AT,
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
  document.getElementById("reviewed").textContent = reviewed + " of " + rows.length + " reviewed" +
    (stored ? "" : " (this browser does not keep them: export before closing the page)");
  document.querySelector('button[data-filter="unreviewed"] .n').textContent = rows.length - reviewed;
}

body.addEventListener("click", event => {
  const image = event.target.closest("figure img");
  if (image) { showFull(image); return; }
  const button = event.target.closest("button");
  if (!button) return;
  const row = button.closest("tr"), exam = row.dataset.exam, call = row.dataset.call;
  const old = verdicts[exam] || {};
  let v;
  if (button.dataset.verdict === "agree") v = {verdict: "agree", density: call};
  else if (button.dataset.verdict === "disagree")
    v = {verdict: "disagree", density: old.verdict === "disagree" ? old.density : ""};
  else v = {verdict: button.dataset.category === call ? "agree" : "disagree", density: button.dataset.category};
  v.at = new Date().toISOString();
  verdicts[exam] = v;
  store(); paint(row); refresh();
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
      reviewed_at: v.at, run: RUN};
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
document.addEventListener("keydown", e => { if (e.key === "Escape") box.click(); });

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
.categories, .verdict {{ white-space: nowrap; }}
.categories button {{ min-width: 2em; }}
#full {{ position: fixed; inset: 0; background: rgba(0,0,0,.9); z-index: 5; text-align: center; cursor: zoom-out; }}
#full img {{ width: 98vw; height: 92vh; object-fit: contain; margin-top: 1vh; }}
#full p {{ color: #eee; margin: .3em; }}
</style></head><body data-run="{run}" data-columns="{columns}">
<h1>{title}</h1>
<p class="summary">{summary}</p>
{card}
<div class="notes">{conventions}</div>
<div class="bar"><button id="sort" type="button">p_dense &#8595; (highest first)</button>
<span>Show only:</span> {filters}
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
