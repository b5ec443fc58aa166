"""`nft` offline, from shards, like every other loss: `gdro train` on a dataset with a reference cache takes a
live reference for it (the cache holds errors, not the velocities nft needs)."""
from __future__ import annotations

import math

import pytest
from gdro_testing import run_train, transformer_weights

from pipeline.errors import GdroError

from .test_train_e2e import datasets, differs, make_cfg, metrics  # noqa: F401  (datasets: the module's fixture)

pytestmark = pytest.mark.slow


def test_nft_trains_offline_from_a_cached_dataset(datasets, tiny_toy_model):  # noqa: F811
    out = datasets["root"] / "run_nft"
    run_train(make_cfg(tiny_toy_model, datasets["cached"], out, "train.steps=2", "train.loss=nft"))
    recs = metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["rho_mean"] == 0.0  # step 0: the live copy is the policy, both branches' errors agree
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert differs(transformer_weights(out / "export"), transformer_weights(tiny_toy_model))


def test_nft_with_the_cache_is_refused(datasets, tiny_toy_model):  # noqa: F811
    with pytest.raises(GdroError, match="velocities"):
        run_train(make_cfg(tiny_toy_model, datasets["cached"], datasets["root"] / "run_nft_cache",
                           "train.steps=1", "train.loss=nft", "train.reference=cache"))
