"""Fault injection: SIGKILL `deltapass tune` workers at random points; the study and the cache must survive.

Two workers tune a tiny random Llama (tests/tiny_llama.py) on the CPU against one journal. The
script kills one of them (at random, the younger one more often, so that the other lives on and kills
reach every phase of a job, not only start-ups) after a random delay, restarts it at once, and does so
--kills times; then it lets both finish. After every kill it reads the study, and at the end checks:
  - no complete trial is lost (every trial once seen complete is still complete, with the same
    parameters and values) or duplicated (no two complete trials with the same parameters), and the
    study holds exactly --trials complete trials;
  - the study resumes: the last workers exit 0, having found or finished the study;
  - the cache entry is readable: the cache dir holds an entry, and every entry loads ("ok").
Output: a JSON record of every kill (victim, delay, the worker's last output line, the study then)
and a Markdown summary, in --out. Exit code 0 when every check holds, 1 otherwise.

Not run in CI: a worker's start (torch, transformers, the dense baseline, a compile) takes tens of
seconds on a CPU, so 20 kills take many minutes. Its committed output (with the command that made
it, and the study's journal) is in benchmarks/results/fault_injection/:

    python tests/fault_injection_tune.py --out benchmarks/results/fault_injection --kills 20 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = "fault-injection"
NOISE = ("Warning", "warn(", "forward_call", "deprecated")      # library warnings say nothing of the phase


def _tail(path: Path) -> str:
    """The worker's last output line (progress bars write \\r-separated updates)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()
             if line.strip() and not any(noise in line for noise in NOISE)]
    return lines[-1][:160] if lines else "(no output yet)"


def _trials(journal: Path) -> dict:
    """The study's trials by number: state, params, values (the journal read as a worker would)."""
    import optuna

    from deltapass.search.storage import open_storage

    if not journal.exists():
        return {}
    try:
        study = optuna.load_study(study_name=STUDY, storage=open_storage(journal))
    except KeyError:                      # not created yet
        return {}
    return {t.number: {"state": t.state.name, "params": t.params, "values": t.values}
            for t in study.get_trials(deepcopy=False)}


class Workers:
    def __init__(self, args, work: Path, env: dict) -> None:
        self.args, self.work, self.env = args, work, env
        self.procs: list[subprocess.Popen | None] = [None, None]
        self.logs = [work / "worker0.log", work / "worker1.log"]
        self.starts = 0
        self.started = [0.0, 0.0]

    def command(self) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "deltapass.cli", "tune", "--model", str(a.model), "--device", "cpu",
                "--cpu-smoke", "--length", str(a.length), "--trials", str(a.trials), "--samples", "1",
                "--storage", str(self.work / "journal.log"), "--study", STUDY, "--out", str(self.work / "reports")]

    def start(self, i: int) -> None:
        with self.logs[i].open("a") as log:
            log.write(f"\n==== start {self.starts} ====\n")
        log = self.logs[i].open("a")
        self.started[i] = time.monotonic()
        self.procs[i] = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.work)
        self.starts += 1

    def kill(self, i: int) -> int | None:
        """SIGKILL worker i; its exit code if it had already ended."""
        proc = self.procs[i]
        ended = proc.poll()
        if ended is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return ended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and Markdown results")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one, kept)")
    parser.add_argument("--model", type=Path, default=None, help="tiny model folder (default: built in the scratch)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--max-delay", type=float, default=60.0, help="kill after uniform(1, this) seconds")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill schedule")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_llama import save_tiny_llama

    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="deltapass-fault-injection-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        args.model = work / "model" if (work / "model" / "config.json").exists() else save_tiny_llama(work / "model")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DELTAPASS_CACHE_DIR"] = str(work / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    journal = work / "journal.log"
    workers = Workers(args, work, env)
    start = time.monotonic()
    workers.start(0)
    workers.start(1)

    try:
        return _inject(args, rng, work, journal, workers, start)
    finally:
        for proc in workers.procs:
            if proc is not None and proc.poll() is None:
                proc.kill()


def _inject(args, rng: random.Random, work: Path, journal: Path, workers: Workers, start: float) -> int:
    kills, seen_complete, problems = [], {}, []
    for k in range(args.kills):
        delay = rng.uniform(1.0, args.max_delay)
        time.sleep(delay)
        ages = [now - t for now, t in ((time.monotonic(), t) for t in workers.started)]
        # The younger one more often: the other then lives long enough to be killed deep into its job.
        victim = rng.choices((0, 1), weights=ages[::-1])[0]
        phase = _tail(workers.logs[victim])
        ended = workers.kill(victim)
        trials = _trials(journal)
        for number, t in trials.items():
            if number in seen_complete and (t["state"] != "COMPLETE" or t != seen_complete[number]):
                problems.append(f"after kill {k}: complete trial {number} became {t}")
        seen_complete |= {n: t for n, t in trials.items() if t["state"] == "COMPLETE"}
        states = [t["state"] for t in trials.values()]
        kills.append({"kill": k, "seconds": round(time.monotonic() - start, 1), "delay": round(delay, 1),
                      "victim": victim, "victim_age": round(ages[victim], 1), "already_ended": ended, "last_output": phase,
                      "trials": {s: states.count(s) for s in sorted(set(states))}})
        print(f"kill {k}: worker {victim} after {delay:.1f} s at {phase!r}; {kills[-1]['trials']}", flush=True)
        workers.start(victim)

    codes = []
    for proc in workers.procs:
        codes.append(proc.wait(timeout=3600))
    final = _trials(journal)
    for number, t in seen_complete.items():
        if final.get(number) != t:
            problems.append(f"complete trial {number} was lost or changed: {t} -> {final.get(number)}")
    complete = [t for t in final.values() if t["state"] == "COMPLETE"]
    params = [json.dumps(t["params"], sort_keys=True) for t in complete]
    if len(set(params)) != len(params):
        problems.append(f"{len(params) - len(set(params))} complete trial(s) repeat another's parameters")
    if len(complete) != args.trials:
        problems.append(f"{len(complete)} complete trials, --trials {args.trials}")
    if codes != [0, 0]:
        problems.append(f"the last workers exited with {codes}: " + "; ".join(_tail(p) for p in workers.logs))

    from deltapass.cache import TunedConfigCache

    cache = TunedConfigCache(work / "cache")
    entries = [(path.name, status) for path, _, status in cache.entries()]
    if not entries or any(status != "ok" for _, status in entries):
        problems.append(f"cache entries: {entries}")
    states = [t["state"] for t in final.values()]
    result = {"command": " ".join(["python", "tests/fault_injection_tune.py", *sys.argv[1:]]),
              "kills": kills, "final_trials": {s: states.count(s) for s in sorted(set(states))},
              "complete_trials": len(complete), "trials_asked": args.trials, "worker_starts": workers.starts,
              "last_exit_codes": codes, "torn_journal_backups": len(list(work.glob("journal.log.torn-*"))),
              "work": str(work), "cache_entries": entries, "seconds": round(time.monotonic() - start, 1), "problems": problems}
    shutil.copyfile(journal, args.out / "journal.log")
    (args.out / "fault_injection.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# deltapass tune under SIGKILL: {args.kills} kills, two workers, one journal", "",
             f"`{result['command']}` ({result['seconds']:.0f} s, CPU, tiny random Llama, --length {args.length}, "
             f"--trials {args.trials})", "",
             "| kill | at s | worker (s since its start) | its last output line | study then |", "|---|---|---|---|---|"]
    for r in kills:
        cell = r["last_output"].replace("|", "/")
        lines.append(f"| {r['kill']} | {r['seconds']} | {r['victim']} ({r['victim_age']}) | {cell} | {r['trials']} |")
    lines += ["", f"Final study: {result['final_trials']}; last workers' exit codes {codes}; "
              f"{result['torn_journal_backups']} torn-journal backup(s); cache: {entries}.", "",
              "Checks: " + ("all hold (no complete trial lost or duplicated, exactly --trials complete, the study "
                            "resumed, the cache entry loads)." if not problems else "FAILED: " + "; ".join(problems))]
    (args.out / "fault_injection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
