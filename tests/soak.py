"""Endurance soak: many consecutive training runs and chats in ONE app process; prints a table.

    .venv/bin/python scripts/soak.py                    # 15 cycles on a small random model (28 MiB)
    .venv/bin/python scripts/soak.py --cycles 20 --steps 12
    .venv/bin/python scripts/soak.py --model bundled    # the bundled SmolLM2 (slower cycles)

The app is launched as a user launches it (`python app.py`, a temporary runs folder). Each
cycle is one visitor (a fresh gradio_client session): pick the data, start a run, follow it
to `finished` through the page's own status endpoint, then two chat turns with the new run
(base and tuned replies, which loads that run's adapter into the app). After each cycle the
app process is measured: RSS, child processes (any left alive, zombies counted apart), open
file descriptors and threads. A leak shows as a column that keeps growing; the test
tests/hardening/test_soak.py runs a few cycles of the same loop and asserts on it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLE = ROOT / "examples" / "json_answers.jsonl"
GREEDY = (0.0, 1.0, 12)  # temperature, top_p, max tokens
REAP_WAIT_S = 15.0
"""How long a cycle waits for its run's supervisor to exit after the run says finished."""


@dataclass
class Sample:
    """The app process after one cycle."""

    cycle: int
    rss_mib: float
    children: int
    """Child processes still alive (a finished run's supervisor must be gone)."""
    zombies: int
    """Children that exited and were never reaped (waited for) by the app."""
    fds: int
    threads: int
    seconds: float
    run_id: str
    state: str


def app_sample(pid: int) -> tuple[float, int, int, int, int]:
    """(RSS MiB, live children, zombie children, open fds, threads) of process `pid`."""
    proc = psutil.Process(pid)
    kids = proc.children(recursive=True)
    zombies = sum(1 for k in kids if _status(k) == psutil.STATUS_ZOMBIE)
    live = sum(1 for k in kids if _status(k) not in (psutil.STATUS_ZOMBIE, None))
    return proc.memory_info().rss / 2**20, live, zombies, proc.num_fds(), proc.num_threads()


def _status(proc: psutil.Process) -> str | None:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return None


def wait_status(client, pattern: str, timeout: float) -> str:
    """Poll the page's status paragraph (/attach: the active run, else the newest) until it matches."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = client.predict(api_name="/attach")[0]
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    raise TimeoutError(f"status never matched {pattern!r}; last: {text}")


def train_settings(model: str, steps: int, **over) -> list:
    """The Train tab's widgets in the order of the /start endpoint (`over`: fields to change)."""
    from lora_studio.ui.train_tab import FIELDS

    values = dict(
        model=model, quantize=False, method="lora", rank=4, alpha=8, lr=1e-3, lr_ratio=1.0, epochs=30, batch_size=4,
        max_seq_len=128, dropout=0.0, max_steps=steps, target="all-linear", seed=0, warmup_ratio=0.03,
        weight_decay=0.0, use_rslora=False, val_fraction=0.0, packing=False, drop_invalid=False, grad_accum_steps=1,
        gradient_checkpointing=False, precision="auto", checkpoint_every=max(1, steps // 2), eval_every=0,
        method_options="", trust_remote_code=False, probes="", early_stop=0, strategy="auto",
    )  # fmt: skip
    values.update(over)
    return [values[f] for f in FIELDS]


def one_cycle(
    url: str, model: str, steps: int, timeout: float = 300.0, auth: tuple[str, str] | None = None, delete: bool = False
) -> tuple[str, str]:
    """One visitor: data, a run of `steps` steps to its end, two chat turns with it (and with
    `delete`, the run deleted). Returns (run id, final state as the page words it)."""
    from gradio_client import Client, handle_file

    client = Client(url, auth=auth, verbose=False)
    client.predict(handle_file(str(EXAMPLE)), None, "", "auto", "", "", model, 128, api_name="/inspect_data")
    text = client.predict(*train_settings(model, steps), api_name="/start")[0]
    run_id = re.match(r"\*\*(\S+): ", text).group(1)
    final = wait_status(client, rf"\*\*{re.escape(run_id)}: (finished|failed|stopped|aborted)\*\*", timeout)
    state = re.match(r"\*\*\S+: (\w+)\*\*", final).group(1)
    if state != "finished":
        raise RuntimeError(f"run {run_id} did not finish: {final}")
    _, base, tuned = client.predict(run_id, "Say the word Paris", [], [], *GREEDY, api_name="/chat")
    client.predict(run_id, "And the word fox?", base, tuned, *GREEDY, api_name="/chat")
    if delete:
        client.predict(run_id, [], api_name="/delete")
    client.close()
    return run_id, state


def settle(pid: int, timeout: float = REAP_WAIT_S) -> tuple[float, int, int, int, int]:
    """The app's sample once its children are gone (or the timeout): a finished run's
    supervisor exits a moment after the run writes `done`."""
    deadline = time.monotonic() + timeout
    while True:
        sample = app_sample(pid)
        if (sample[1] == 0 and sample[2] == 0) or time.monotonic() > deadline:
            return sample
        time.sleep(0.2)


def soak(
    url: str, pid: int, model: str, cycles: int, steps: int, on_sample=None, auth=None, delete: bool = False
) -> list[Sample]:
    samples = []
    for n in range(1, cycles + 1):
        t0 = time.monotonic()
        run_id, state = one_cycle(url, model, steps, auth=auth, delete=delete)
        rss, live, zombies, fds, threads = settle(pid)
        sample = Sample(n, rss, live, zombies, fds, threads, time.monotonic() - t0, run_id, state)
        samples.append(sample)
        if on_sample:
            on_sample(sample)
    return samples


def tiny_model(folder: Path) -> str:
    """The tests' tiny random Llama and BPE tokenizer (tests/conftest.py), saved to `folder`."""
    from tests.conftest import _save, build_tokenizer, tiny_llama

    tok = build_tokenizer()
    return _save(tiny_llama(len(tok)), tok, folder)


def small_model(folder: Path, hidden: int = 384, layers: int = 4) -> str:
    """A random Llama of about 7.4 M parameters (28 MiB of fp32 weights) with the tests' tokenizer:
    still seconds to train, but big enough that one model the app failed to free (the chat
    loads each new run's model) would stand out of the RSS noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _save, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    return _save(LlamaForCausalLM(config), tok, folder)


def model_weights_mib(model_dir: str) -> float:
    """Size of the model's weight files: what one leaked copy of the chat model would add."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 2**20


HEADER = "| cycle | RSS MiB | growth vs cycle 2 | children alive | zombies | open fds | threads | seconds |"


def row(sample: Sample, ref: Sample | None) -> str:
    growth = f"{sample.rss_mib - ref.rss_mib:+.1f}" if ref else ""
    return (
        f"| {sample.cycle} | {sample.rss_mib:.1f} | {growth} | {sample.children} | {sample.zombies} | {sample.fds} | "
        f"{sample.threads} | {sample.seconds:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument(
        "--model", default="small", help="small or tiny (random, built here), bundled, or a model folder"
    )
    parser.add_argument(
        "--max-sessions", type=int, default=None,
        help="the app's LORA_STUDIO_MAX_SESSIONS (default: the app's own, 200); each cycle is a new session",
    )  # fmt: skip
    parser.add_argument(
        "--delete", action="store_true",
        help="delete each run at the end of its cycle (the runs folder stays the same size)",
    )
    args = parser.parse_args(argv)

    from tests.ui.conftest import launch_app, stop_app

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        builders = {"tiny": tiny_model, "small": small_model}
        model = builders[args.model](tmp / args.model) if args.model in builders else args.model
        env = {"LORA_STUDIO_MAX_SESSIONS": str(args.max_sessions)} if args.max_sessions else None
        app = launch_app(tmp / "runs", model, tmp / "app.log", env)
        try:
            rss0, *_ = app_sample(app.process.pid)
            print(
                f"app pid {app.process.pid}, model {args.model} ({model_weights_mib(model):.1f} MiB of weights), "
                f"{args.steps} steps a run; RSS after launch {rss0:.1f} MiB\n"
            )
            print(HEADER)
            print("|---|---|---|---|---|---|---|---|")
            seen: list[Sample] = []

            def show(sample: Sample) -> None:
                seen.append(sample)
                print(row(sample, seen[1] if len(seen) > 1 else None), flush=True)

            samples = soak(app.url, app.process.pid, model, args.cycles, args.steps, on_sample=show, delete=args.delete)
        finally:
            stop_app(app)
    if len(samples) >= 3:
        after = [s.rss_mib for s in samples[1:]]
        print(
            f"\nRSS from cycle 2 on: min {min(after):.1f}, max {max(after):.1f}, last - cycle 2 = "
            f"{samples[-1].rss_mib - samples[1].rss_mib:+.1f} MiB; children left alive: "
            f"{max(s.children for s in samples)}, zombies: {max(s.zombies for s in samples)}, "
            f"fds {samples[1].fds} -> {samples[-1].fds}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
