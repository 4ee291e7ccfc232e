"""dens-infer on Ray Data, on a real local Ray cluster: the same rows and CSVs as the local engine on
synthetic, hostile and real files; a killed Ray worker; resume;
shards and dens-merge; manifests. The two-node cluster is tests/test_ray_nodes.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pandas as pd
import pytest

from dens import labels
from dens.exams import aggregate_paths
from dens.infer.config import InferConfig
from dens.infer.runner import run
from dens.preds.merge import MergeError, merge
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
                os.kill(pids[0], signal.SIGKILL)
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
    with pytest.raises(MergeError, match="overlap"):
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
