"""Datasets at a URL, served here by http.server on 127.0.0.1: `gdro train` from the URL gives the losses it gives
from the local folder; a tampered remote shard stops training with its name; `gdro verify`, `inspect` and
`rescore` take the URL too."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gdro_testing import run_train

from .conftest import PROMPTS, copy_dataset, make_cfg, run

REWARD = "toy_color_area"  # a reward with spread even on a random model's images, so the losses are not 0


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def dataset(tiny_toy_model, tmp_path_factory):
    return run(make_cfg(tiny_toy_model, tmp_path_factory.mktemp("remote") / "ds",
                        f"rollouts.rewards={{{REWARD}: {{}}, toy_geneval: {{}}}}"))


@pytest.fixture
def served(dataset, tmp_path):
    """(url of the dataset, its served folder, the requests made) for a copy of the dataset."""
    root = tmp_path / "www"
    copy_dataset(dataset, root / "ds")
    requests: list[str] = []

    class Handler(_Quiet):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ds", root / "ds", requests
    server.shutdown()
    server.server_close()


def _cfg(model, dataset, out, *extra):
    from pipeline.config import ExperimentConfig, resolve

    return resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={model}", f"rollouts.prompts={PROMPTS}", f"train.dataset={dataset}", f"train.out={out}",
        "train.steps=3", "train.groups_per_step=2", "train.save_every=3", "train.lr=1e-3",
        f"train.reward_weights={{{REWARD}: 1.0}}", *extra])


def _losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("order", ["shuffled", "sequential"])
def test_training_from_a_url_gives_the_local_losses(served, dataset, tiny_toy_model, tmp_path, order):
    url, _, requests = served
    local = run_train(_cfg(tiny_toy_model, dataset, tmp_path / "local", f"train.data_order={order}"))
    remote = run_train(_cfg(tiny_toy_model, url, tmp_path / "remote", f"train.data_order={order}"))
    assert _losses(remote) == _losses(local) and len(_losses(local)) == 3 and any(_losses(local))
    assert any(r.endswith(".tar") for r in requests) and "/ds/manifest.json" in requests


def test_a_tampered_remote_shard_stops_training_with_its_name(served, tiny_toy_model, tmp_path):
    from schemas.codec import ShardError

    url, folder, _ = served
    tar = folder / "shards" / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    out = tmp_path / "run"
    with pytest.raises(ShardError, match=r"shard 000000: http://127\.0\.0\.1:\d+/ds/shards/000000\.tar sha256 differs"):
        run_train(_cfg(tiny_toy_model, url, out, "train.data_order=sequential"))
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()  # no step taken


def _cli(*args, env_extra=None):
    env = {**os.environ, "WDS_SECURE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_verify_and_inspect_take_a_url(served, tmp_path):
    url, folder, _ = served
    r = _cli("verify", url)
    assert r.returncode == 0 and f"OK {url}" in r.stdout, r.stdout + r.stderr
    r = _cli("inspect", url, "--sheet", str(tmp_path / "sheet.png"))
    assert r.returncode == 0 and f"dataset {url}:" in r.stdout and (tmp_path / "sheet.png").is_file(), r.stderr
    pq_file = folder / "shards" / "000001.parquet"
    pq_file.write_bytes(pq_file.read_bytes()[:-10] + b"0123456789")
    r = _cli("verify", url)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "BAD shard 000001" in r.stdout and "000001.parquet sha256 differs" in r.stdout, r.stdout


def test_rescore_takes_a_url_and_records_it(served, tmp_path):
    url, folder, _ = served
    from stages.rescore import main

    out = main(url, "toy_quality", tmp_path / "rescored")
    m = json.loads((out / "manifest.json").read_text())
    step = m["lineage"][-1]
    import hashlib

    assert step["parent"] == url
    assert step["parent_manifest_sha256"] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert not (tmp_path / "rescored.parent-mirror").exists()
    from schemas.manifest import verify_dataset

    assert verify_dataset(out) == []


def test_an_s3_url_goes_through_aws_s3_cp(dataset, tmp_path, monkeypatch):
    """s3:// runs `aws s3 cp URL -` through webdataset's Pipe: here a stand-in `aws` on PATH serving a folder."""
    from pipeline.train_data import check_datasets, group_batches

    bucket = tmp_path / "bucket"
    copy_dataset(dataset, bucket / "ds")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(f'#!/bin/sh\n[ "$1 $2" = "s3 cp" ] && [ "$4" = "-" ] || exit 2\n'
                                 f'exec cat "{bucket}/${{3#s3://bucket/}}"\n')
    (bin_dir / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    check_datasets("s3://bucket/ds", {REWARD: 1.0}, verify=True)
    kw = {"groups": 2, "weights": {REWARD: 1.0}, "seed": 0, "rank": 0, "world": 1, "workers": 0,
          "shuffle_buffer": 1, "order": "sequential"}
    remote, local = iter(group_batches("s3://bucket/ds", **kw)[1]), iter(group_batches(dataset, **kw)[1])
    for _ in range(4):
        a, b = next(remote), next(local)
        assert a["keys"] == b["keys"] and (a["latents"] == b["latents"]).all()
