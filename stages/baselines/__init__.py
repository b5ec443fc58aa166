"""Online baselines, for comparison only: not product recipes (gdro trains offline, `stages/train.py`).

Each is the peers' loop rebuilt from gdro's components (backends, the sampler, rewards, the loss family, the
evaluation), on the same model, prompt pool and rewards as the product, so that `gdro compare-online` can put
them beside offline gdro in wall-clock seconds:

- `forward.py`: online DGPO (arXiv 2510.08425: ODE rollouts from the current policy every iteration, one (t, eps)
  shared by each group, t in DGPO's clipped range, frozen reference + KL) and online DiffusionNFT (arXiv
  2509.16117: the same rollouts, the `nft` loss with the sampling model as v_old);
- `flow_grpo.py`: Flow-GRPO (arXiv 2505.05470: SDE rollouts with per-step Gaussian log-probabilities, the clipped
  ratio and the KL to the frozen reference on the steps' means);
- `common.py`: setup, rollouts from the current policy, scoring, evaluation with eval's fixed noise, the loop.

Plain PyTorch on one process (no DeepSpeed): they are yardsticks on the toy world, not a way to train.
"""
