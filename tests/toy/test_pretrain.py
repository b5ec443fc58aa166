"""The toy pre-training recipe: runs, learns (loss falls), saves a loadable model, logs evaluations."""
import json

import numpy as np

from pipeline.backends.toy import ToyBackend
from pipeline.config import ToyPretrainConfig
from stages.toy_pretrain import main


def test_pretrain_learns_and_saves(tmp_path):
    cfg = ToyPretrainConfig(out=str(tmp_path / "m"), steps=60, batch_size=16, lr=2e-3, warmup_steps=5, text_dim=32,
                            layers=1, heads=2, head_dim=16, eval_every=60, eval_n=6, eval_sampler_steps=2,
                            keep_every=0, threads=1)
    out = main(cfg)
    log = [json.loads(l) for l in (out / "pretrain_log.jsonl").read_text().splitlines()]
    assert len(log) == 60 and "eval" in log[-1]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < 0.7 * first  # it learns the rendered scenes' statistics
    backend = ToyBackend.from_pretrained(out)
    assert backend.transformer.config.num_layers == 1
    assert json.loads((out / "pretrain_config.json").read_text())["steps"] == 60
