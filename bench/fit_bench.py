"""Time `cbs fit` end to end on a synthetic study of 1000 runs (not a test; prints the figures).

The study follows the pretrain/study contract (runs/<run>/config.yaml + result.json + metrics.jsonl): 5 model sizes
x 10 batch sizes (32 .. 16384 sequences) x 20 hyper-parameter points = 1000 runs; every run serves the 4 data
budgets of its model (one sweep read at several targets), so the fit sees 20 settings x 10 batches x 20 runs = 4000
observations. About 1% of runs are unfinished (no result.json), the worst LR diverges at large batches after it
crossed the smaller budgets' targets, and the largest budget's target is never reached at the smallest batch (a
censored point, a lower bound in the fit) nor by the worst LRs. Each run logs 40 throughput lines (some "nan").

    .venv/bin/python bench/fit_bench.py [--runs-per-batch 20] [--bootstrap 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cbs.analysis.cli import fit_main  # noqa: E402
from cbs.analysis.cost import ThroughputModel, study_throughput  # noqa: E402
from cbs.analysis.outputs import render_outputs  # noqa: E402
from cbs.analysis.steps import load_steps  # noqa: E402
from cbs.analysis.study_fit import fit_study  # noqa: E402

MODELS = {"m85M": 85e6, "m151M": 151e6, "m302M": 302e6, "m604M": 604e6, "m1.2B": 1.2e9}
BUDGET_MULTIPLIERS = (5, 10, 20, 40)  # D = k N tokens (20 N: Chinchilla)
BATCHES = [32 * 2**i for i in range(10)]
SEQ_LEN = 512


def _setting(model: str, k: int) -> dict:
    n = MODELS[model]
    return {"name": f"{model}_d{k}N", "model_params": int(n), "tokens": int(k * n),
            "target_loss": round(4.5 - 0.1 * math.log(n / 85e6) - 0.15 * math.log2(k), 6)}


def _steps(setting: dict, batch: int) -> float:
    """S(B) = S_min (1 + B_noise/B) with B_noise ~ D^0.5 (Zhang et al. find CBS ~ D^0.47)."""
    b_noise = 0.03 * setting["tokens"] ** 0.5
    s_min = setting["tokens"] / (SEQ_LEN * 3 * b_noise)
    return s_min * (1 + b_noise / batch)


def _crossing(steps: float | None) -> dict | None:
    return None if steps is None else {"step": math.ceil(steps), "tokens": 0, "step_interp": round(steps, 2)}


def _metrics(batch: int, world_size: int, rng: np.random.Generator) -> str:
    """40 train-log lines with throughput (every 8th "nan", as metrics.jsonl writes a non-finite value) and
    10 eval lines."""
    tokens_per_s = 2e5 * world_size * min(1.0, batch / world_size / 64) ** 0.5
    lines = []
    for i in range(40):
        value = "nan" if i % 8 == 7 else tokens_per_s * math.exp(rng.normal(0, 0.05))
        lines.append({"step": 10 * (i + 1), "tokens": 10 * (i + 1) * batch * SEQ_LEN, "train/loss": 3.5, "lr": 1e-3,
                      "perf/tokens_per_s": value, "perf/tokens_per_s_per_rank": value})
        if i % 4 == 3:
            lines.append({"step": 10 * (i + 1), "tokens": 0, "eval/loss": 3.4, "eval/loss_ewa/0.999": 3.3})
    return "".join(json.dumps(x) + "\n" for x in lines)


def _result(settings: list[dict], batch: int, j: int, runs_per_batch: int, rng: np.random.Generator) -> dict:
    lr_factor = 1 + 0.05 * j  # the first hyper-parameter point is the best
    diverged = j == runs_per_batch - 1 and batch >= 4096
    targets, reached_at, missed_at = [], [], []
    for s in settings:
        base = _steps(s, batch) * lr_factor * math.exp(rng.normal(0, 0.03))
        # the largest budget's target is out of reach for the worst LRs, and at B=32 for every LR (the run stops
        # at 90% of the steps it would need); a diverging run crosses the smaller budgets' targets, then diverges
        reached = not (s is settings[-1] and (lr_factor > 1.8 or batch == 32 or diverged))
        ewa = {tau: _crossing(base * f if reached else None) for tau, f in (("0.999", 1.0), ("0.9995", 1.03))}
        targets.append({"loss": s["target_loss"], "raw": _crossing(base * 1.1 if reached else None), "ewa": ewa})
        (reached_at if reached else missed_at).append(base * (1.1 if reached else 0.9))
    steps = math.ceil(min(missed_at) if missed_at else max(reached_at))  # stopped at the targets or the cap
    return {"status": "diverged" if diverged else "completed", "reason": "", "steps": steps,
            "tokens": steps * batch * SEQ_LEN, "total_steps": steps, "wall_seconds": 0.0, "final": {},
            "targets": targets, "world_size": 8}


def write_study(root: Path, runs_per_batch: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    n_runs = 0
    for model in MODELS:
        settings = [_setting(model, k) for k in BUDGET_MULTIPLIERS]
        for batch in BATCHES:
            for j in range(runs_per_batch):
                run = root / "runs" / f"{model}_b{batch}_hp{j}"
                run.mkdir(parents=True)
                config = {"global_batch_seqs": batch, "model": {"seq_len": SEQ_LEN},
                          "optim": {"lr": 1e-3 * 1.2**j}, "study": {"settings": settings},
                          "resolved": {"world_size": 8}}
                (run / "config.yaml").write_text(yaml.safe_dump(config))
                n_runs += 1
                if rng.random() < 0.01:
                    continue  # unfinished
                (run / "metrics.jsonl").write_text(_metrics(batch, 8, rng))
                (run / "result.json").write_text(json.dumps(_result(settings, batch, j, runs_per_batch, rng)))
    return n_runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-per-batch", type=int, default=20)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--keep", type=Path, default=None, help="write the study and the fit here (else a temp dir)")
    args = p.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="cbs_fit_bench_"))
    try:
        study, out = root / "study", root / "fit"
        t0 = time.perf_counter()
        n_runs = write_study(study, args.runs_per_batch)
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        rc = fit_main([str(study), "--out", str(out), "--bootstrap", str(args.bootstrap)])
        t_total = time.perf_counter() - t0
        assert rc == 0

        # the same work again, stage by stage, to say where the time goes
        t0 = time.perf_counter()
        table = load_steps(study)
        t_load = time.perf_counter() - t0
        throughput = ThroughputModel(tuple(study_throughput(table.runs)), "metrics.jsonl")
        t_tp = time.perf_counter() - t0 - t_load
        fit = fit_study(table, n_resamples=args.bootstrap, throughput=throughput)
        t_fit = time.perf_counter() - t0 - t_load - t_tp
        files = render_outputs(fit)
        t_render = time.perf_counter() - t0 - t_load - t_tp - t_fit
        n_png = sum(name.endswith(".png") for name in files)
        censored = sum(p.lower_bound for p in table.points)
        print(f"\nstudy: {n_runs} runs, {len(table.settings())} settings, {len(table.points)} (setting, batch) points, "
              f"{censored} censored (lower bounds) (generated in {t_gen:.1f} s)")
        print(f"cbs fit end to end: {t_total:.2f} s (bootstrap {args.bootstrap} per setting)")
        print(f"  read study {t_load:.2f} s | throughput from metrics.jsonl {t_tp:.2f} s | fits + bootstrap + laws + "
              f"time table {t_fit:.2f} s | tables + report + {n_png} PNGs {t_render:.2f} s "
              f"({t_render / n_png:.3f} s per figure)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
