"""dens-infer on Ray Data, on a real local Ray cluster: the same rows and CSVs as the local engine on
synthetic, hostile and real files; a killed Ray worker; resume;
shards, their records and dens-merge's checks of a set; manifests and their identity columns; a working directory
that must not reach the workers. The two-node cluster is tests/test_ray_nodes.py's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import synthetic_breast
from dens import labels
from dens.commands import EXIT_FAILED, EXIT_OK
from dens.exams import aggregate_paths
from dens.infer.config import InferConfig
from dens.infer.runner import run
from dens.merge.cli import main as merge_main
from dens.preds.columns import HEADER, LATERALITY_SOURCE
from dens.preds.lock import output_lock
from dens.preds.merge import MergeError, merge
from dens.preds.shard import record_path
from dens.sources import Shard, manifest_paths
from ray_cases import read, same

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the ray extra: pip install 'dens[ray]'")

PROBS = list(labels.PROB_COLUMNS)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray of 2 CPUs for the module, as Ray's own tests share one."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_the_ray_engine_writes_what_the_local_engine_writes(cluster, mixed_studies, small_model, local_preds, tmp_path):
    out = tmp_path / "preds.csv"
    summary = run(InferConfig(mixed_studies, out, model=small_model, engine="ray", progress=False))
    same(local_preds, out)
    preds = read(out)
    assert set(preds[labels.STATUS]) == {"ok", "skipped", "error"} and summary.files == len(preds)
    assert summary.exit_code == 3  # the hostile files' error rows


def test_a_killed_ray_worker_costs_time_not_rows(cluster, mixed_studies, small_model, local_preds, tmp_path):
    killed = []

    def kill_a_decoder():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            found = subprocess.run(["pgrep", "-f", "MapBatches\\(_Decode\\)"], capture_output=True, text=True)
            pids = [int(p) for p in found.stdout.split()]
            if pids:
                time.sleep(0.5)  # let it take a batch first
                try:
                    os.kill(pids[0], signal.SIGKILL)
                except ProcessLookupError:  # it ended meanwhile (a loaded machine): look for another
                    continue
                killed.append(pids[0])
            time.sleep(0.1)

    thread = threading.Thread(target=kill_a_decoder, daemon=True)
    thread.start()
    out = tmp_path / "preds.csv"
    run(InferConfig(mixed_studies, out, model=small_model, engine="ray", progress=False))
    thread.join()
    assert killed, "no decode actor was seen to kill"
    same(local_preds, out)


def test_the_ray_engine_resumes_a_run_cut_short(cluster, mixed_studies, small_model, local_preds, tmp_path):
    out = tmp_path / "preds.csv"
    lines = local_preds.read_text(encoding="utf-8", errors="surrogateescape").splitlines(keepends=True)
    out.write_text("".join(lines[: len(lines) // 2]), encoding="utf-8", errors="surrogateescape")
    summary = run(InferConfig(mixed_studies, out, model=small_model, engine="ray", resume=True, progress=False))
    assert summary.already_done == len(lines) // 2 - 1
    same(local_preds, out)


def test_shards_partition_the_archive_and_merge_into_the_whole(mixed_studies, small_model, local_preds, tmp_path):
    parts = []
    for i in range(3):
        part = tmp_path / f"preds.{i}.csv"
        run(InferConfig(mixed_studies, part, model=small_model, workers=2, shard=f"{i}/3", progress=False))
        parts.append(read(part))
    paths = [set(p[labels.PATH]) for p in parts]
    assert all(paths) and not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    merged = merge([tmp_path / f"preds.{i}.csv" for i in range(3)], tmp_path / "merged.csv")
    assert merged.rows == len(read(local_preds))
    whole, joined = read(local_preds), read(tmp_path / "merged.csv")
    key = [labels.PATH]
    pd.testing.assert_frame_equal(
        whole.drop(columns=PROBS).sort_values(key).reset_index(drop=True),
        joined.drop(columns=PROBS).sort_values(key).reset_index(drop=True),
    )
    for a, b in zip(aggregate_paths(local_preds), aggregate_paths(tmp_path / "merged.csv"), strict=True):
        assert len(read(a)) == len(read(b))  # exams split between shards are whole again
    with pytest.raises(MergeError, match="given twice"):
        merge([tmp_path / "preds.0.csv", tmp_path / "preds.0.csv"], tmp_path / "twice.csv")


def test_a_shard_is_the_same_on_every_run():
    shard = Shard.parse("1/4")
    paths = [f"/archive/{i}/{j}.dcm" for i in range(50) for j in range(4)]
    taken = [p for p in paths if shard.takes(p)]
    assert 25 <= len(taken) <= 75 and taken == [p for p in paths if Shard(1, 4).takes(p)]
    assert sum(Shard(i, 4).takes(p) for i in range(4) for p in paths) == len(paths)
    for bad in ("4/4", "1/0", "x", "-1/2"):
        with pytest.raises(ValueError):
            Shard.parse(bad)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_manifest_lists_the_files_and_every_one_gets_a_row(mixed_studies, small_model, tmp_path, kind):
    files = sorted(str(p.relative_to(mixed_studies)) for p in mixed_studies.rglob("*.dcm"))[:5]
    table = pd.DataFrame({"path": [*files, "missing/nowhere.dcm"], "note": "x"})
    manifest = mixed_studies.parent / f"manifest.{kind}"
    table.to_csv(manifest, index=False) if kind == "csv" else table.to_parquet(manifest, index=False)
    assert list(manifest_paths(manifest)) == [str(mixed_studies.parent / p) for p in table["path"]]
    out = tmp_path / "preds.csv"
    run(InferConfig(manifest, out, model=small_model, workers=2, progress=False))
    preds = read(out)
    assert len(preds) == 6 and preds[labels.PATH].iloc[-1].endswith("nowhere.dcm")
    assert preds[labels.STATUS].iloc[-1] == "error" and "not exist" in preds[labels.REASON].iloc[-1]


@pytest.mark.parametrize(
    ("resources", "device"),
    [({"CPU": 1}, "auto"), ({"CPU": 2}, "auto"), ({"CPU": 16}, "cpu"), ({"CPU": 32, "GPU": 4}, "auto")],
)
def test_the_plan_fits_the_cluster(resources, device):
    """Every actor the plan asks for can start at once on the cluster: a pool that cannot would wait forever."""
    from dens.infer.ray_engine import plan

    p = plan(resources, device, None)
    assert p.decoders >= 1 and p.scorers >= 1
    assert p.decoders * p.decoder_cpus + p.scorers * p.scorer_cpus <= resources["CPU"]
    assert p.scorers * p.scorer_gpus <= resources.get("GPU", 0)
    if resources.get("GPU"):
        assert p.scorer_gpus == 1 and p.scorers == resources["GPU"]


# --- shard records and dens-merge's checks of a set ---------------------------------------------------------


@pytest.fixture(scope="module")
def shards(synthetic_cohort, small_model, tmp_path_factory) -> dict[str, Path]:
    """The preds.csv of shard runs over one small cohort (0/2, 1/2 and 1/3), and of 1/2 over a copy of it."""
    root = tmp_path_factory.mktemp("shards")
    studies = synthetic_cohort(3, seed=5)
    shutil.copytree(studies, root / "copy")
    made = {}
    for name, folder, shard in [
        ("0/2", studies, "0/2"),
        ("1/2", studies, "1/2"),
        ("1/3", studies, "1/3"),
        ("copy 1/2", root / "copy", "1/2"),
    ]:
        out = root / name.replace("/", "-of-").replace(" ", "-") / "preds.csv"
        run(InferConfig(folder, out, model=small_model, workers=1, shard=shard, progress=False))
        made[name] = out
    return made


def merge_cli(*args):
    return CliRunner().invoke(merge_main, [*map(str, args)])


def copied(shard: Path, folder: Path, edit=None, *, record: bool = True) -> Path:
    """A copy of ``shard`` (and its record, unless not ``record``) in ``folder``; ``edit`` changes the record."""
    folder.mkdir(parents=True)
    out = folder / shard.name
    shutil.copyfile(shard, out)
    if record:
        data = json.loads(record_path(shard).read_text())
        record_path(out).write_text(json.dumps(edit(data) if edit else data))
    return out


def test_a_shard_run_records_its_shard_model_and_inputs_where_the_walk_never_reads_them(
    synthetic_cohort, small_model, tmp_path
):
    studies = tmp_path / "studies"
    shutil.copytree(synthetic_cohort(3, seed=5), studies)
    out = studies / "out" / "preds.csv"  # inside STUDIES: its own outputs are never inputs
    run(InferConfig(studies, out, model=small_model, workers=1, shard="0/1", progress=False))
    record = json.loads(record_path(out).read_text())
    assert record_path(out).parent == out.parent and record_path(out).name == "preds.shard.json"
    assert (record["shard"], record["index"], record["count"], record["complete"]) == ("0/1", 0, 1, True)
    assert record["model_sha256"] == hashlib.sha256(small_model.read_bytes()).hexdigest()
    assert record["studies"] == str(studies.resolve()) and record["manifest_sha256"] == ""
    preds = read(out)
    assert record["rows"] == len(preds) and not preds[labels.PATH].str.contains("shard.json").any()
    again = run(InferConfig(studies, out, model=small_model, workers=1, shard="0/1", resume=True, progress=False))
    assert again.files == 0 and json.loads(record_path(out).read_text())["rows"] == len(preds)
    with pytest.raises(Exception, match="--shard 0/1"):  # a resume must take the shard it continues
        run(InferConfig(studies, out, model=small_model, workers=1, shard="0/2", resume=True, progress=False))


def test_dens_merge_refuses_an_incomplete_or_mixed_set_of_shards(shards, tmp_path):
    alone = merge_cli(shards["0/2"], "--out", tmp_path / "alone.csv")
    assert alone.exit_code == EXIT_FAILED and "1/2" in alone.output and "missing" in alone.output, alone.output
    assert not (tmp_path / "alone.csv").exists()
    allowed = merge_cli(shards["0/2"], "--out", tmp_path / "allowed.csv", "--allow-incomplete")
    assert allowed.exit_code == EXIT_OK, allowed.output
    assert "incomplete" in allowed.output and "1/2" in allowed.output and "missing" in allowed.output
    assert len(read(tmp_path / "allowed.csv")) == len(read(shards["0/2"]))

    twice = merge_cli(shards["0/2"], shards["0/2"], shards["1/2"], "--out", tmp_path / "twice.csv")
    assert twice.exit_code == EXIT_FAILED and "given twice" in twice.output, twice.output
    split = merge_cli(shards["0/2"], shards["1/3"], "--out", tmp_path / "split.csv", "--allow-incomplete")
    assert split.exit_code == EXIT_FAILED and "0/2" in split.output and "1/3" in split.output, split.output
    inputs = merge_cli(shards["0/2"], shards["copy 1/2"], "--out", tmp_path / "inputs.csv")
    assert inputs.exit_code == EXIT_FAILED and "other inputs" in inputs.output, inputs.output
    other = copied(shards["1/2"], tmp_path / "other-model", lambda r: {**r, "model_sha256": "f" * 64})
    model = merge_cli(shards["0/2"], other, "--out", tmp_path / "model.csv")
    assert model.exit_code == EXIT_FAILED and "another model" in model.output, model.output

    whole = merge_cli(shards["0/2"], shards["1/2"], "--out", tmp_path / "whole.csv")
    assert whole.exit_code == EXIT_OK, whole.output
    assert "wrote {}, {}".format(*aggregate_paths(tmp_path / "whole.csv")) in whole.output
    assert len(read(tmp_path / "whole.csv")) == len(read(shards["0/2"])) + len(read(shards["1/2"]))


def test_dens_merge_refuses_a_shard_being_written_empty_unfinished_or_without_its_record(shards, tmp_path):
    with output_lock(shards["1/2"]):
        busy = merge_cli(shards["0/2"], shards["1/2"], "--out", tmp_path / "busy.csv")
    assert busy.exit_code == EXIT_FAILED and "still being written" in busy.output, busy.output

    empty = copied(shards["1/2"], tmp_path / "empty")
    empty.write_bytes(b"")
    said = merge_cli(shards["0/2"], empty, "--out", tmp_path / "e.csv").output
    assert f"{empty} is empty (0 bytes)" in said, said
    empty.write_text(HEADER)
    said = merge_cli(shards["0/2"], empty, "--out", tmp_path / "h.csv").output
    assert f"{empty} holds no rows (only the header)" in said, said

    unfinished = copied(shards["1/2"], tmp_path / "unfinished", lambda r: {**r, "complete": False})
    said = merge_cli(shards["0/2"], unfinished, "--out", tmp_path / "u.csv").output
    assert "did not finish" in said and "--resume" in said, said

    bare = copied(shards["1/2"], tmp_path / "bare", record=False)
    refused = merge_cli(shards["0/2"], bare, "--out", tmp_path / "bare.csv")
    assert refused.exit_code == EXIT_FAILED and "no shard record" in refused.output, refused.output
    assert "--allow-incomplete" in refused.output
    taken = merge_cli(shards["0/2"], bare, "--out", tmp_path / "bare.csv", "--allow-incomplete")
    assert taken.exit_code == EXIT_OK and "not checked" in taken.output, taken.output


# --- a manifest's identity, and the working directory ---------------------------------------------------------


def test_both_engines_give_a_manifests_identity_to_the_rows(cluster, mixed_studies, small_model, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (side, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        image = synthetic_breast(seed=i)
        cv2.imwrite(str(images / f"{i}.pgm"), image if side == "L" else image[:, ::-1].copy())
        rows.append({"path": f"images/{i}.pgm", "patient_id": "7", "study_id": "s7", "laterality": side, "view": view})
    dicom = sorted(mixed_studies.glob("*/*/*.dcm"))[0]  # a cohort image
    rows.append({"path": str(dicom), "patient_id": "7", "study_id": "s7", "laterality": "R", "view": "CC"})
    rows.append({"path": "images/gone.pgm", "patient_id": "7", "study_id": "s7", "laterality": "L", "view": "CC"})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    local, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    run(InferConfig(manifest, local, model=small_model, workers=1, plain_images=True, progress=False))
    run(InferConfig(manifest, ray_out, model=small_model, engine="ray", plain_images=True, progress=False))
    same(local, ray_out)
    preds = read(ray_out)
    assert list(preds[labels.STATUS]) == ["ok"] * 5 + ["error"]
    assert set(preds[labels.STUDY_UID].iloc[:4]) == {"s7"}
    assert list(preds[LATERALITY_SOURCE].iloc[:4]) == ["manifest"] * 4
    assert preds[labels.STUDY_UID].iloc[4] != "s7"  # the DICOM's header keeps its own
    assert (preds[labels.STUDY_UID].iloc[5], preds[labels.LATERALITY].iloc[5]) == ("s7", "L")  # an error row too


def test_ray_workers_do_not_import_from_the_working_directory(mixed_studies, small_model, tmp_path):
    """Ray puts the driver's working directory on its workers' import path: a folder there named like a module
    the workers import would break every one of them, with the cause only in Ray's worker logs."""
    cwd = tmp_path / "cwd"
    (cwd / "dens").mkdir(parents=True)
    (cwd / "dens" / "__init__.py").write_text('raise ImportError("the dens folder of the working directory")\n')
    studies = tmp_path / "studies"
    studies.mkdir()
    for i, path in enumerate(sorted(mixed_studies.glob("*/*/*.dcm"))[:2]):
        shutil.copyfile(path, studies / f"{i}.dcm")
    out = tmp_path / "preds.csv"
    script = Path(sys.executable).parent / "dens-infer"  # as a user runs it: the working directory is not on its path
    command = [str(script), str(studies), "--out", str(out), "--model", str(small_model), "--engine", "ray"]
    done = subprocess.run([*command, "--no-progress"], cwd=cwd, capture_output=True, text=True, timeout=240)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert list(read(out)[labels.STATUS]) == ["ok", "ok"]
