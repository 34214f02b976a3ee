"""The trackers behind cbs/pipeline/metrics.py's interface: TensorBoard's loss against tokens and hyper-parameters
(read back with TensorBoard's own loader), and Weights & Biases offline (read back from the run's .wandb file,
no network), unit-level and through a real tiny pretrain run."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pretrain import SEQ, make_cfg

from cbs.pipeline import pretrain
from cbs.pipeline.config import ConfigError, PretrainConfig, WandbConfig, WandbMode, from_dict
from cbs.pipeline.metrics import BY_TOKENS, WANDB_ID, RunIdentity, Tracker, loss_key, read_metrics

IDENTITY = RunIdentity("m_b8", "study1", {"global_batch_seqs": 8, "lr": 0.003, "model": "tiny"})


def tb_events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def tb_hparams(path: Path) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = tb_events(path).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def log_run(tracker: Tracker, steps: range, tokens_per_step: int, offset: float = 0.0) -> None:
    for s in steps:
        tracker.log({"train/loss": 10.0 / s + offset, "lr": 0.1, "eval/loss_ewa/0.9": 9.0 / s}, s, s * tokens_per_step)


def test_loss_key_names_the_token_axis_tags():
    assert loss_key("train/loss") == "train/loss_vs_tokens"
    assert loss_key("eval/loss_ewa/0.999") == "eval/loss_ewa_vs_tokens/0.999"
    assert loss_key("perf/tokens_per_s") is None and loss_key("lr") is None


def test_tensorboard_has_loss_against_tokens_and_the_hyper_parameters(tmp_path):
    tracker = Tracker(tmp_path, identity=IDENTITY)
    log_run(tracker, range(1, 6), 1000)
    tracker.close()
    by_tokens = tb_events(tmp_path / "tb" / BY_TOKENS)
    assert {"train/loss_vs_tokens", "eval/loss_ewa_vs_tokens/0.9"} <= set(by_tokens.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in by_tokens.Scalars("train/loss_vs_tokens")] == [
        (1000, 10.0), (2000, 5.0), (3000, 3.3333), (4000, 2.5), (5000, 2.0)]
    assert "lr" not in by_tokens.Tags()["scalars"]  # only losses get a token axis
    assert [e.step for e in tb_events(tmp_path / "tb").Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert tb_hparams(tmp_path / "tb") == {"global_batch_seqs": 8.0, "lr": 0.003, "model": "tiny"}


def test_a_resume_purges_the_token_axis_from_the_checkpoint_on(tmp_path):
    tracker = Tracker(tmp_path, identity=IDENTITY)
    log_run(tracker, range(1, 11), 100)  # a crash after step 10, the checkpoint at 5
    tracker.close()
    tracker = Tracker(tmp_path, identity=IDENTITY, resume_step=5)
    log_run(tracker, range(6, 9), 100, offset=1.0)
    tracker.close()
    events = {e.step: e.value for e in tb_events(tmp_path / "tb" / BY_TOKENS).Scalars("train/loss_vs_tokens")}
    assert sorted(events) == [100 * s for s in range(1, 9)]  # 900 and 1000 are gone
    assert events[500] == pytest.approx(2.0) and events[600] == pytest.approx(10 / 6 + 1)


def wandb_records(run_dir: Path, runs: int = 1, timeout_s: float = 30.0) -> list:
    """wandb_file_records once `runs` runs have written their exit record: W&B's core process writes the file
    after wandb.finish() returns."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_file_records(run_dir)
        if sum(r.WhichOneof("record_type") == "exit" for r in records) >= runs or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_file_records(run_dir: Path) -> list:
    """Every record of the run's offline .wandb files, in order. The file is W&B's LevelDB-style log: a 7-byte
    header (':W&B', magic, version), then 32 KiB blocks of chunks (4-byte CRC, 2-byte length, 1-byte type:
    1 full, 2 first, 3 middle, 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_history(run_dir: Path, runs: int = 1) -> list[dict]:
    import json

    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(run_dir, runs)
            if r.WhichOneof("record_type") == "history"]


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_gets_the_run_group_config_and_metrics_against_tokens(tmp_path, offline):
    tracker = Tracker(tmp_path, tensorboard=False, identity=IDENTITY, wandb=WandbConfig(project="cbs-test"))
    log_run(tracker, range(1, 4), 1000)
    tracker.log({"train/noise_scale": float("nan"), "train/noise_scale_batches": [4, 8]}, 4, 4000)
    tracker.close()
    records = wandb_records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.run_group, run.display_name) == ("cbs-test", "study1", "m_b8")
    config = {i.key: i.value_json for i in run.config.update if not i.key.startswith("_")}
    assert config == {"global_batch_seqs": "8", "lr": "0.003", "model": '"tiny"'}
    metrics = {(r.metric.name or r.metric.glob_name, r.metric.step_metric) for r in records
               if r.WhichOneof("record_type") == "metric"}
    assert ("*", "tokens") in metrics  # every chart against tokens by default
    history = wandb_history(tmp_path)
    assert [(h["_step"], h["tokens"], h["train/loss"]) for h in history[:3]] == [
        (1, 1000, 10.0), (2, 2000, 5.0), (3, 3000, pytest.approx(10 / 3))]
    assert "train/noise_scale_batches" not in history[3]  # a list is not a scalar


def test_wandb_resume_continues_the_same_run(tmp_path, offline):
    tracker = Tracker(tmp_path, tensorboard=False, identity=IDENTITY, wandb=WandbConfig(project="cbs-test"))
    log_run(tracker, range(1, 3), 10)
    tracker.close()
    first = (tmp_path / WANDB_ID).read_text().strip()
    tracker = Tracker(tmp_path, tensorboard=False, identity=IDENTITY, resume_step=2,
                      wandb=WandbConfig(project="cbs-test"))
    log_run(tracker, range(3, 5), 10)
    tracker.close()
    assert (tmp_path / WANDB_ID).read_text().strip() == first
    assert {r.run.run_id for r in wandb_records(tmp_path, 2) if r.WhichOneof("record_type") == "run"} == {first}
    assert [h["_step"] for h in wandb_history(tmp_path, 2)] == [1, 2, 3, 4]


def test_a_wandb_that_cannot_start_leaves_the_run_training_and_says_why(tmp_path, monkeypatch, caplog):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")
    for key in [k for k in __import__("os").environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: no API key, so online mode cannot start
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config"))
    (tmp_path / "run").mkdir()
    tracker = Tracker(tmp_path / "run", tensorboard=False, identity=IDENTITY,
                      wandb=WandbConfig(project="cbs-test", mode=WandbMode.online))
    log_run(tracker, range(1, 3), 10)
    tracker.close()
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert "not logging to W&B in this run" in caplog.text and "WANDB_MODE=offline" in caplog.text


def test_log_wandb_config_is_validated(tmp_path):
    base = {"data_dir": "d", "run_dir": "r", "global_batch_seqs": 8, "train_tokens": 100}
    with pytest.raises(ConfigError, match=r"pretrain\.log\.wandb\.project is required"):
        from_dict(PretrainConfig, {**base, "log": {"wandb": {}}}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain\.log\.wandb\.mode must be one of"):
        from_dict(PretrainConfig, {**base, "log": {"wandb": {"project": "p", "mode": "shared"}}}, "pretrain")


def test_a_pretrain_run_logs_to_wandb_offline_and_tensorboard_by_tokens(stdlib_data, tmp_path, offline):
    cfg = make_cfg(stdlib_data, tmp_path / "run", train_tokens=8 * SEQ * 6, checkpoint={"every_steps": 100},
                   eval={"every_steps": 3}, log={"every_steps": 1, "wandb": {"project": "cbs-test"}},
                   study={"name": "demo", "settings": [{"name": "tiny_d1"}]})
    pretrain.main(cfg)
    run = tmp_path / "run"
    losses = {m["step"]: m["train/loss"] for m in read_metrics(run) if "train/loss" in m}
    history = {h["_step"]: h for h in wandb_history(run) if "train/loss" in h}
    assert sorted(history) == sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(history[s]["train/loss"] == pytest.approx(losses[s]) and history[s]["tokens"] == s * 8 * SEQ
               for s in losses)
    (record,) = [r.run for r in wandb_records(run) if r.WhichOneof("record_type") == "run"]
    assert (record.run_group, record.display_name) == ("demo", "run")
    config = {i.key: i.value_json for i in record.config.update}
    assert config["global_batch_seqs"] == "8" and config["settings"] == '"tiny_d1"'
    tokens_axis = tb_events(run / "tb" / BY_TOKENS).Scalars("train/loss_vs_tokens")
    assert [e.step for e in tokens_axis] == [s * 8 * SEQ for s in range(1, 7)]
    assert tb_hparams(run / "tb")["study"] == "demo"
