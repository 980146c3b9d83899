"""D3/D4: trackers leave readable files; a dead rank fails the others instead of hanging."""
import json
import os
import signal
import subprocess
import time

from launch_util import PRETRAIN, REPO, TINY, env, launcher, pretrain


def wandb_history(path):
    """History rows of an offline .wandb file: LevelDB-style log blocks of protobuf Records
    (7-byte ':W&B' header, 32 KiB blocks, 7-byte record headers: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            payload = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_tensorboard_and_wandb_offline_are_readable(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    pretrain(run_dir, "train.max_steps=4", "train.checkpoint_every=4", "report_to=tensorboard,wandb", kind="python",
             check=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert "val_bpb" in acc.Tags()["scalars"]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "W&B offline should leave one run folder"
    (wandb_file,) = runs[0].glob("*.wandb")
    losses = [float(v["loss"]) for v in wandb_history(wandb_file) if "loss" in v]
    assert len(losses) == 4
    # A resumed run continues the same W&B run (its id), rather than starting a new one.
    pretrain(run_dir, "train.max_steps=6", "resume=auto", "report_to=wandb", kind="python", check=True)
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and ids == {(run_dir / "wandb_run_id").read_text()}
    # No secret is ever written to the saved config or logs.
    saved = (run_dir / "config.yaml").read_text() + (run_dir / "metrics.jsonl").read_text()
    assert "WANDB_API_KEY" not in saved and "api_key" not in saved


def test_killed_rank_fails_the_others_within_the_timeout(tmp_path, data_dir):
    """SIGKILL one of 2 ranks mid-run: the survivor exits with an error well before it would
    hang forever (dist_timeout_s=60)."""
    run_dir = tmp_path / "run"
    cmd = [*launcher(2), PRETRAIN, *TINY, f"run_dir={run_dir}", "train.max_steps=100000", "train.dist_timeout_s=60"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").is_file() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 3:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        import psutil
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "pretrain_gpt.py" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in workers]
        killed_at = time.time()
        workers[-1].kill()  # SIGKILL one worker rank
        proc.wait(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 90, f"survivors took {elapsed:.0f} s to fail"


def test_prometheus_endpoint_serves_the_metrics(tmp_path):
    """Rank 0 serves the logged metrics for a scraper while the run goes on."""
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    cmd = [*launcher(1, "python"), PRETRAIN, *TINY, f"run_dir={run_dir}", "train.max_steps=100000",
           f"prometheus_port={port}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.time() + 240, ""
        while "zerokit_loss" not in body:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no metrics served within 240 s"
            time.sleep(0.5)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                pass
        assert "zerokit_tokens_per_s" in body and "zerokit_step" in body
    finally:
        proc.kill()
        proc.wait()


def test_resume_keeps_metrics_up_to_its_checkpoint_and_drops_a_torn_line(tmp_path):
    from zerokit.metrics import MetricsLogger
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    logger = MetricsLogger(tmp_path, "none", {}, enabled=True, start_step=5)
    logger.log({"step": 6, "loss": 0.5})
    logger.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_kill_while_trimming_metrics_leaves_the_old_history(tmp_path, monkeypatch):
    """The trim is written aside and renamed: dying before the rename (here: fsync raises, as a SIGKILL
    would stop it) leaves the file as it was. Truncating in place lost steps 1..21 of a CI run."""
    import pytest
    from zerokit.metrics import MetricsLogger
    path = tmp_path / "metrics.jsonl"
    history = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 10))
    path.write_text(history)

    def killed(fd):
        raise SystemExit("killed")
    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(SystemExit):
        MetricsLogger(tmp_path, "none", {}, enabled=True, start_step=6)
    assert path.read_text() == history
