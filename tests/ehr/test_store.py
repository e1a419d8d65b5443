"""The sharded `prepare` and its token store, against the whole-cohort construction written out here: every stored
input equals building it from all the events at once, whatever the workers and the shard size; a killed prepare
resumes without redoing its finished shards; an unreadable shard stops the run with one line naming it."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from medstate.data.meds import scan_meds
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import ARRAYS, ValueBins, at_end_of_day, build_sequence
from medstate.ehr.store import Samples
from medstate.ehr.tasks import TaskSuite, cap_per_subject
from medstate.ehr.visits import later_stay_keys
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError

CONFIG = PrepareConfig(max_length=200, max_samples_per_subject=3)


def one_pass_edges(train, n_bins):
    """Value bins as the single in-memory pass computed them (polars' exact linear quantiles per code)."""
    numeric = train.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
    quantiles = [q / n_bins for q in range(1, n_bins)]
    edges = numeric.group_by("code").agg(*(pl.col("numeric_value").quantile(q, "linear").alias(f"q{i}")
                                           for i, q in enumerate(quantiles)))  # fmt: skip
    return {row[0]: [float(v) for v in row[1:]] for row in edges.sort("code").iter_rows()}


def whole_cohort(meds, config):
    """The inputs built from every event at once (one pass, no shards, no store): the definition of prepare."""
    events = at_end_of_day(scan_meds(meds).collect(), config.date_only_codes)
    split_of = dict(events.select("subject_id", "split").unique("subject_id").iter_rows())
    train = events.filter(pl.col("split") == "train")
    bins = ValueBins(config.value_bins, one_pass_edges(train, config.value_bins))
    sequences = {
        sid: build_sequence(sid, frame, bins, config.visit)
        for (sid,), frame in events.partition_by("subject_id", as_dict=True, maintain_order=True).items()
    }
    suite = TaskSuite.load(config.tasks)
    vocab = Vocabulary.fit(
        [s.tokens for sid, s in sequences.items() if split_of[sid] == "train"],
        config.min_count,
        [t.token for t in suite.tasks],
    )
    labels = suite.label(events).with_columns(pl.col("subject_id").replace_strict(split_of).alias("split"))
    caps = {t.name: t.max_samples_per_subject or config.max_samples_per_subject for t in suite.tasks}
    labels = cap_per_subject(labels, caps, config.seed)
    hidden = later_stay_keys(suite.stays(events), labels)
    tasks = {t.name: t for t in suite.tasks}
    finetune = {}
    for row, keys in zip(labels.iter_rows(named=True), hidden):
        task = tasks[row["task"]]
        history = sequences[row["subject_id"]].until(row["prediction_time"], keys, close=task.closes_visit)
        prompted = history.prompted(task.token, config.max_length, config.prompt)
        finetune[(row["task"], row["subject_id"], row["visit_key"])] = (row["label"], vocab.encode(prompted.tokens),
                                                                        prompted)  # fmt: skip
    pretrain = {sid: s.truncate(config.max_length) for sid, s in sequences.items()}
    return vocab, bins, pretrain, finetune


def assert_inputs_equal(out, vocab, bins, pretrain, finetune):
    assert Vocabulary.load(out / "vocab.json").tokens == vocab.tokens
    stored = Samples.read(out, "pretrain")
    assert stored.frame["subject_id"].to_list() == sorted(pretrain)
    for sid, arrays, length in zip(stored.frame["subject_id"].to_list(), stored.arrays, stored.lengths):
        expected = pretrain[sid]
        assert arrays["input_ids"].tolist() == vocab.encode(expected.tokens) and length == len(expected)
        for name in ARRAYS[1:]:
            np.testing.assert_array_equal(arrays[name], getattr(expected, name), err_msg=name)
    stored = Samples.read(out, "finetune")
    keys = stored.frame.select("task", "subject_id", "visit_key").rows()
    assert sorted(keys) == sorted(finetune) and len(keys) == len(finetune)
    for key, label, arrays, length in zip(keys, stored.frame["label"], stored.arrays, stored.lengths):
        expected_label, ids, expected = finetune[key]
        assert label == expected_label and arrays["input_ids"].tolist() == ids and length == len(ids)
        for name in ARRAYS[1:]:
            np.testing.assert_array_equal(arrays[name], getattr(expected, name), err_msg=f"{key} {name}")


@pytest.fixture(scope="module")
def reference(mimic_csv_meds):
    return whole_cohort(mimic_csv_meds.summary.output, CONFIG)


@pytest.mark.parametrize(("workers", "shard_subjects"), [(1, 2000), (2, 7)])
def test_every_stored_input_equals_the_whole_cohort_build(mimic_csv_meds, reference, tmp_path, workers, shard_subjects):
    vocab, bins, pretrain, finetune = reference
    out = tmp_path / "prepared"
    prepare(mimic_csv_meds.summary.output, out, CONFIG, workers=workers, shard_subjects=shard_subjects)
    units = sorted(p.name for p in (out / "shards").iterdir())
    assert len(units) == (3 if shard_subjects == 2000 else 2 + 2 + 12)  # 10 + 10 + 80 subjects, 7 at most per unit
    assert json.loads((out / "value_bins.json").read_text())["edges"] == bins.edges
    assert_inputs_equal(out, vocab, bins, pretrain, finetune)


def test_columns_the_sequences_do_not_use_still_reach_the_labels(mimic_csv_meds, tmp_path):
    """A unit reads only the columns sequences, visits and tasks use: a death known only from
    hospital_expire_flag (no //DIED code, no MEDS_DEATH row) must still end the stay in death."""
    meds = tmp_path / "meds"
    subprocess.run(["cp", "-r", str(mimic_csv_meds.summary.output), str(meds)], check=True)
    for shard in (meds / "data").rglob("*.parquet"):
        events = pl.read_parquet(shard).filter(pl.col("code") != "MEDS_DEATH")
        events.with_columns(pl.col("code").str.replace("//DIED$", "//OTHER")).write_parquet(shard)
    vocab, bins, pretrain, finetune = whole_cohort(meds, CONFIG)
    out = tmp_path / "prepared"
    prepare(meds, out, CONFIG, shard_subjects=30)
    assert_inputs_equal(out, vocab, bins, pretrain, finetune)
    stays = TaskSuite.load(None).stays(scan_meds(meds).collect())
    assert stays["died"].sum() > 0  # the test has something to find


PREPARE_SLOWLY = """
import sys, time
import medstate.ehr.shards as shards
from medstate.ehr.prepare import PrepareConfig, prepare
real = shards._write_unit
def slow(job, folder):
    real(job, folder)
    time.sleep(0.3)  # between the files and the rename: a kill here leaves a partial unit
shards._write_unit = slow
prepare(sys.argv[1], sys.argv[2], PrepareConfig(max_length=200, max_samples_per_subject=3), shard_subjects=5)
"""


def test_a_killed_prepare_resumes_and_skips_its_finished_shards(mimic_csv_meds, reference, tmp_path):
    out = tmp_path / "prepared"
    process = subprocess.Popen([sys.executable, "-c", PREPARE_SLOWLY, str(mimic_csv_meds.summary.output), str(out)])
    shards = out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len([p for p in shards.glob("d*")] if shards.is_dir() else []) < 3:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in shards.glob("d*"))
    for name in finished:
        (shards / name / "kept").touch()  # gone if the unit were written again
    assert 3 <= len(finished) < 20 and not (out / "samples.parquet").exists()  # killed part-way
    done = []
    prepare(mimic_csv_meds.summary.output, out, CONFIG, progress=lambda stage, n, total: done.append((stage, n, total)),
            shard_subjects=5)  # fmt: skip
    assert all((shards / name / "kept").is_file() for name in finished)  # not redone
    units = len(list(shards.glob("d*")))
    stages = list(dict.fromkeys(stage for stage, _, _ in done))
    assert stages == ["shards", "token ids", "index"]  # the bins were read back, not fitted again
    assert done[-1] == ("index", 3, 3) and ("shards", units, units) in done and ("token ids", units, units) in done
    assert not list(shards.glob(".*"))  # no partial unit left behind
    assert_inputs_equal(out, *reference)
    with pytest.raises(MedstateError, match="prepared with other settings"):
        prepare(mimic_csv_meds.summary.output, out, PrepareConfig(max_length=100), shard_subjects=5)


def test_a_worker_that_dies_is_one_error_not_a_traceback_of_the_pool(mimic_csv_meds, tmp_path):
    script = tmp_path / "unguarded.py"  # no `if __name__ == "__main__":`: every spawned worker fails to start
    script.write_text("import sys\nfrom medstate.ehr.prepare import prepare\n"
                      "prepare(sys.argv[1], sys.argv[2], workers=2, shard_subjects=30)\n")  # fmt: skip
    result = subprocess.run([sys.executable, str(script), str(mimic_csv_meds.summary.output), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "MedstateError: a prepare worker died" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "samples.parquet").exists()


def test_an_unreadable_shard_stops_the_run_naming_it(mimic_csv_meds, tmp_path):
    meds = tmp_path / "meds"
    subprocess.run(["cp", "-r", str(mimic_csv_meds.summary.output), str(meds)], check=True)
    broken = meds / "data" / "train" / "1.parquet"
    data = (meds / "data" / "train" / "0.parquet").read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated: no footer
    with pytest.raises(MedstateError, match=r"1\.parquet"):
        prepare(meds, tmp_path / "out", CONFIG)
    assert not (tmp_path / "out" / "shards").exists() or not list((tmp_path / "out" / "shards").glob("*1of1"))
    result = subprocess.run(
        [sys.executable, "-m", "medstate.cli", "ehr", "prepare", str(meds), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "1.parquet" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_empty_training_shard_is_no_training_split(mimic_csv_meds, tmp_path):
    meds = tmp_path / "meds"
    subprocess.run(["cp", "-r", str(mimic_csv_meds.summary.output), str(meds)], check=True)
    for shard in (meds / "data" / "train").glob("*.parquet"):
        pl.read_parquet(shard).head(0).write_parquet(shard)  # the columns, no rows
    with pytest.raises(MedstateError, match="no train split"):
        prepare(meds, tmp_path / "out", CONFIG)


@pytest.fixture
def ray_cluster(tmp_path):
    """A local Ray cluster started as a user would (`ray start --head`), on loopback; stopped afterwards."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'medstate[ray]')")
    cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port = 20000 + os.getpid() % 20000
    start = [cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    started = subprocess.run(start, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.skip(f"a local Ray cluster did not start: {started.stderr.strip().splitlines()[-1:]}")
    yield f"127.0.0.1:{port}"
    ray.shutdown()
    subprocess.run([cli, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow  # a Ray cluster's start and its workers' imports: about 2 minutes on 2 cores
def test_the_shard_map_on_a_ray_cluster_gives_the_same_inputs(mimic_csv_meds, reference, tmp_path, ray_cluster):
    out = tmp_path / "prepared"
    prepare(mimic_csv_meds.summary.output, out, CONFIG, shard_subjects=7, executor="ray", address=ray_cluster)
    assert len(list((out / "shards").iterdir())) == 16
    assert_inputs_equal(out, *reference)


def test_the_ray_executor_names_a_cluster_it_cannot_reach(mimic_csv_meds, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed")
    with pytest.raises(MedstateError, match=r"cannot reach a Ray cluster at 127\.0\.0\.1:9"):
        prepare(mimic_csv_meds.summary.output, tmp_path / "p", CONFIG, executor="ray", address="127.0.0.1:9")
    with pytest.raises(MedstateError, match="an address is for the ray executor"):
        prepare(mimic_csv_meds.summary.output, tmp_path / "p", CONFIG, address="127.0.0.1:9")
