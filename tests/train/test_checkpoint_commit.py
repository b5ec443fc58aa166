"""`latest` names a checkpoint tag only after every rank has written its files of that tag (pipeline/runs.py
save_checkpoint): a rank killed mid-save must leave `latest` on the previous, complete tag."""
from __future__ import annotations

from pipeline import runs
from pipeline.config import ExperimentConfig


class FakeEngine:
    """Writes the tag folder like DeepSpeed; records what `latest` said when the other ranks were still saving."""

    def __init__(self, ckdir, events):
        self.ckdir, self.events = ckdir, events

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True, exclude_frozen_parameters=False):
        (self.ckdir / tag).mkdir(parents=True)
        if save_latest:  # what DeepSpeed does on rank 0, before its barrier
            (self.ckdir / "latest").write_text(tag)
        self.events.append(("saved", tag, _latest(self.ckdir)))


def _latest(ckdir):
    p = ckdir / "latest"
    return p.read_text() if p.exists() else None


def test_latest_moves_only_after_the_barrier(tmp_path, monkeypatch):
    import torch.distributed as dist

    events = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: events.append(("barrier", None, _latest(tmp_path))))
    cfg = ExperimentConfig()
    cfg.train.keep_checkpoints = 2
    engine = FakeEngine(tmp_path, events)
    for step in (100, 200, 300):
        runs.save_checkpoint(engine, cfg, tmp_path, step, rank=0)
    # while the ranks meet at the first barrier after saving step_0000200, `latest` still names step 100
    assert events[3] == ("saved", "step_0000200", "step_0000100")
    assert events[4] == ("barrier", None, "step_0000100")
    assert _latest(tmp_path) == "step_0000300"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000200", "step_0000300"]  # pruned to 2


def test_other_ranks_never_write_latest(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    runs.save_checkpoint(FakeEngine(tmp_path, []), ExperimentConfig(), tmp_path, 100, rank=1)
    assert _latest(tmp_path) is None
