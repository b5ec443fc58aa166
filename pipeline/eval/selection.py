"""Model selection during `gdro train`: every `train.eval_every` steps, sample the first `train.eval_num_prompts`
lines of `eval.prompts` (one image each, `eval.base_seed` noise, `eval.*` scores) with the policy, compute the
corrected score against the reference (sampled once, at the start, on the same noise) with the trend over the
evaluations so far, keep the best model in `<train.out>/best/` (a model folder diffusers loads, `best.json` names
its step and scores) and, with `train.patience` > 0, stop after that many evaluations without a better score.
One line per evaluation in `<train.out>/selection.jsonl`; a resumed run continues the history.

Every rank calls `Selector.__call__` at the same steps (under ZeRO-3 gathering the weights is collective); rank 0
samples and scores while the others wait, then the stop decision is broadcast. Selecting on prompts that the
final `gdro eval` also reports biases those numbers slightly upwards for the selected model; point
`eval.prompts` at a validation file for a clean split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..model_folder import export_dtype, host_weights
from ..adapters import lora_scale
from ..runs import BEST, SELECTION, save_best, trim_jsonl
from .stats import CorrectedConfig, corrected_scores, overall


def decide(history: list[dict], patience: int) -> tuple[bool, bool]:
    """(the last evaluation is the best so far, stop now) from records with 'corrected'; ties are not better."""
    values = [r["corrected"] for r in history]
    best = int(np.argmax(values))  # the first of equal maxima
    is_best = best == len(values) - 1
    stop = patience > 0 and len(values) - 1 - best >= patience
    return is_best, stop


class Selector:
    def __init__(self, cfg, out: Path, rank: int, start_step: int, ema=None):
        self.cfg, self.out, self.rank, self.ema = cfg, Path(out), rank, ema  # ema: evaluate the averaged weights
        self.history: list[dict] = []
        if rank != 0:
            return
        from ..backends.base import backend_from_config
        from ..prompt_files import load_prompts
        from .fixed_noise import eval_rewards, verifier_of

        e, t = cfg.eval, cfg.train
        self.metas = load_prompts(e.prompts)[: t.eval_num_prompts]
        self.kinds = [m["tag"] for m in self.metas]
        self.rewards = eval_rewards(cfg)
        self.verifier = verifier_of(cfg.model.backend)
        self.backend = backend_from_config(cfg)  # its transformer takes each policy's weights
        self.ref = self._score()
        log = self.out / SELECTION
        if log.is_file():  # a resumed run: keep the evaluations up to the checkpoint it resumes from
            self.history = trim_jsonl(log, start_step)
        else:
            self.history = [{"step": 0, "lines": len(self.metas), "scores": self.ref, "gain": 0.0, "corrected": 0.0,
                             "reference": True}]
            self._write(self.history[0])

    def _score(self) -> dict[str, float]:
        from .fixed_noise import evaluate_backend

        e = self.cfg.eval
        _, scores = evaluate_backend(self.backend, self.metas, self.cfg.sampler, base_seed=e.base_seed, seeds=1,
                                     batch=e.batch_size, rewards=self.rewards, verifier=self.verifier)
        return {k: float(overall(v, self.kinds)) for k, v in scores.items()}

    def _write(self, record: dict) -> None:
        with open(self.out / SELECTION, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _state(self, engine) -> dict[str, torch.Tensor] | None:
        """Plain weights of the policy on rank 0 in the export dtype (LoRA merged, EMA averaged); collective
        under ZeRO-3."""
        if self.cfg.train.zero_stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return None
        t = self.cfg.train
        return host_weights(state, ema=self.ema, lora_scale=lora_scale(t), dtype=export_dtype(t, engine.module))

    def __call__(self, engine, step: int) -> bool:
        """Evaluate at `step`; True when training should stop (the same answer on every rank)."""
        import torch.distributed as dist

        state = self._state(engine)
        stop = False
        if self.rank == 0:
            e = self.cfg.eval
            self.backend.transformer.load_state_dict(state, strict=True)
            scores = self._score()
            prior = [r for r in self.history if not r.get("reference")]
            steps = [r["step"] for r in prior] + [step]
            c = corrected_scores(steps, [r["scores"][e.target] for r in prior] + [scores[e.target]],
                                 self.ref[e.target],
                                 [[r["scores"][o] for r in prior] + [scores[o]] for o in e.out_of_domain],
                                 [self.ref[o] for o in e.out_of_domain],
                                 CorrectedConfig(e.corrected_lambda, e.corrected_horizon, e.corrected_window))
            record = {"step": step, "lines": len(self.metas), "scores": scores,
                      **{k: float(v[-1]) for k, v in c.items()}}
            is_best, stop = decide(prior + [record], self.cfg.train.patience)
            record["best"] = is_best
            if is_best:
                save_best(self.out, state, config_from=self.backend.transformer, base=self.cfg.model.path,
                          info={"step": step, "corrected": record["corrected"], "scores": scores})
            self.history.append(record)
            self._write(record)
            print(f"select: step {step}: {e.target} {scores[e.target]:.3f}, corrected {record['corrected']:+.3f}"
                  f"{' (best, saved to ' + str(self.out / BEST) + ')' if is_best else ''}"
                  f"{'; no better score for ' + str(self.cfg.train.patience) + ' evaluations: stopping' if stop else ''}",
                  flush=True)
        flag = torch.tensor([1.0 if stop else 0.0], device=engine.device)
        dist.broadcast(flag, 0)
        return bool(flag.item() > 0)
