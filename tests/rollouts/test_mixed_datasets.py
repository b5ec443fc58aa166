"""Several datasets in one run: train.dataset lists datasets of one generator, mixed by train.dataset_weights;
a dataset of another generator is refused with both generator hashes named."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import PROMPTS, make_cfg, run


@pytest.fixture(scope="module")
def second(tiny_toy_model, tmp_path_factory):
    """The same generator as small_dataset, other noise seeds: other groups under the same keys."""
    return run(make_cfg(tiny_toy_model, tmp_path_factory.mktemp("second") / "ds", "rollouts.base_seed=7"))


def _latents_by_dataset(roots) -> list[list[np.ndarray]]:
    from schemas.manifest import array_dtypes, decode_group, iter_tar_groups, load_manifest

    out = []
    for root in roots:
        m = load_manifest(root)
        out.append([decode_group(k, raw, sh["tar"], array_dtypes(m))[1]["latents.npy"]
                    for sh in m["shards"] for k, raw in iter_tar_groups(root / sh["tar"])])
    return out


def _origin(latents: np.ndarray, known: list[list[np.ndarray]]) -> int:
    hits = [d for d, arrays in enumerate(known) if any(np.array_equal(latents, a) for a in arrays)]
    assert len(hits) == 1, hits
    return hits[0]


def _draw(roots, mix, n_batches, seed=0):
    from pipeline.train_data import group_batches

    _, loader = group_batches(roots, groups=4, weights={"toy_geneval": 1.0}, seed=seed, rank=0, world=1, workers=0,
                              shuffle_buffer=4, mix=mix)
    it = iter(loader)
    return [next(it)["latents"].numpy() for _ in range(n_batches)]


def test_groups_are_drawn_by_the_dataset_weights(small_dataset, second):
    roots = [small_dataset, second]
    known = _latents_by_dataset(roots)
    batches = _draw(roots, [3.0, 1.0], 150)
    origins = [_origin(lat, known) for b in batches for lat in b]
    share = origins.count(0) / len(origins)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(origins)), share  # 600 groups, 4 sigma
    again = _draw(roots, [3.0, 1.0], 150)  # the same stream every time: what resume relies on
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    alone = [_origin(lat, known) for b in _draw(roots, [], 50) for lat in b]  # default: by group counts, 1:1 here
    assert 0.3 < alone.count(0) / len(alone) < 0.7


def test_another_generator_is_refused_with_both_hashes(small_dataset, tmp_path):
    from conftest import build_tiny_toy_model

    from pipeline.errors import GdroError
    from pipeline.train_data import check_datasets, generator_hash
    from schemas.manifest import load_manifest

    other_model = build_tiny_toy_model(tmp_path / "other_model", seed=1)
    other = run(make_cfg(other_model, tmp_path / "other", "rollouts.num_prompts=2"))
    ha, hb = generator_hash(load_manifest(small_dataset)), generator_hash(load_manifest(other))
    assert ha != hb
    with pytest.raises(GdroError, match=f"generator {ha}.* by {hb}"):
        check_datasets([small_dataset, other], {"toy_geneval": 1.0}, verify=True)
    with pytest.raises(GdroError, match="2 entries for 1 datasets"):
        check_datasets([small_dataset], {"toy_geneval": 1.0}, verify=True, mix=[1.0, 2.0])


def test_a_run_trains_on_two_datasets(small_dataset, second, tiny_toy_model, tmp_path):
    import json

    from gdro_testing import run_train

    from pipeline.config import ExperimentConfig, resolve

    out = tmp_path / "run"
    cfg = resolve(ExperimentConfig, preset="toy", overrides=[
        f"model.path={tiny_toy_model}", f"rollouts.prompts={PROMPTS}", f"train.dataset=[{small_dataset}, {second}]",
        "train.dataset_weights=[1, 2]", f"train.out={out}", "train.steps=2", "train.groups_per_step=2",
        "train.save_every=2"])
    run_train(cfg)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "config.json").read_text())["train"]["dataset"] == [str(small_dataset), str(second)]
