"""`contraq smooth`: which buffer questions are kept, the NLL it fits, and the run it writes
(tiny random model, a real two-step training run and its real checkpoint)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import smoke_train_cmd
from contraq.lm.sampling import SamplerConfig
from contraq.training.smooth import SmoothConfig, question_nll, select_questions

REPO = Path(__file__).resolve().parents[1]


def _settings(**kw: float) -> SmoothConfig:
    base = dict(run="r", out="o", min_contradiction=0.5, max_per_fact=4, epochs=1, batch_size=8)
    return SmoothConfig(**{**base, "lr": 1e-4, "seed": 0, **kw})


def _entry(text: str, log_r: float, genuine: float = 1.0, c: float = 0.9) -> dict:
    comps = {"log_c": math.log(c), "genuine": genuine, "log_pq": -10.0}
    return {"token_ids": [1, 2, 3], "log_r": log_r, "components": comps, "text": text}


def test_select_keeps_counted_contradictions_best_first_one_per_text():
    entries = {
        "k0": [
            _entry("Where is it?", -5.0),
            _entry("where is it ?", -4.0),  # same text after normalisation, higher reward
            _entry("Who made it?", -6.0),
            _entry("An echo?", -1.0, genuine=0.0),
            _entry("Weak?", -2.0, c=0.3),
        ],
        "k1": [_entry(f"Q{i}?", -float(i)) for i in range(6)],
        "other": [_entry("Not a training fact?", 0.0)],
    }
    kept = select_questions(entries, ["k0", "k1"], _settings(max_per_fact=3))
    assert [(k.fact, k.text) for k in kept] == [
        (0, "where is it ?"),
        (0, "Who made it?"),
        (1, "Q0?"),
        (1, "Q1?"),
        (1, "Q2?"),
    ]
    strict = select_questions(entries, ["k0"], _settings(min_contradiction=0.95))
    assert strict == []


def test_smooth_settings_reject_out_of_range_values():
    done = _contraq("smooth", "run=x", "out=y", "min_contradiction=1.5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "contraq smooth: min_contradiction: must be in (0, 1], got 1.5"
    ]


def test_question_nll_is_minus_the_sum_of_token_logprobs(tiny_llama, smol_tokenizer):
    """Brute force: feed prompt + question tokens one row at a time, no padding."""
    term = smol_tokenizer.convert_tokens_to_ids("?")
    cfg = SamplerConfig(
        termination_token_id=term, pad_token_id=smol_tokenizer.eos_token_id, min_len=1, max_len=8
    )
    prompts = [[5, 6, 7, 8], [9, 10]]
    questions = [[11, 12, term], [13, term]]
    pad = smol_tokenizer.pad_token_id
    with torch.no_grad():
        got = question_nll(tiny_llama, prompts, questions, cfg, pad)
        want = []
        for p, q in zip(prompts, questions, strict=True):
            ids = torch.tensor([p + q])
            logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].float(), -1)
            want.append(-sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(q)))
    assert got.item() == pytest.approx(float(sum(want) / 2), rel=1e-4)


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CONTRAQ_DEBUG", None)
    return env


def _contraq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "contraq.cli", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_smooth_fits_a_runs_buffer_questions_and_writes_a_loadable_run(tmp_path):
    from omegaconf import OmegaConf

    from contraq.buffer import prompt_key
    from contraq.run.folder import load_checkpoint_file
    from contraq.run.load import load_parts, resolve_run
    from contraq.run.parts import Parts, build_prompts, run_split

    run = tmp_path / "run"
    cmd = smoke_train_cmd(run, "train.max_steps=2", "eval.every_n_steps=1000")
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    # The smoke run's reward has no contradiction parts: store what a contradiction run would,
    # under the real prompt keys of two training facts, in the real checkpoint.
    cfg = OmegaConf.load(run / "config.yaml")
    parts = Parts(cfg, with_lora=True)
    facts = run_split(cfg).train
    prompts = build_prompts(cfg, facts[:2], parts.tokenizer)
    tok = parts.tokenizer
    term = parts.term_id

    def entry(text: str, **kw: float) -> dict:
        e = _entry(text, -3.0, **kw)
        e["token_ids"] = tok(text[:-1], add_special_tokens=False)["input_ids"][:5] + [term]
        return e

    state = {
        "version": 1,
        "max_size": 50,
        "near_dup_ratio": 0.25,
        "entries": {
            prompt_key(prompts[0]): [entry("Where is it?"), entry("An echo?", genuine=0.0)],
            prompt_key(prompts[1]): [entry("Who made it?")],
        },
    }
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(ckpt_path)
    ckpt["contraq_buffer"] = json.dumps(state)
    torch.save(ckpt, ckpt_path)

    out = tmp_path / "smoothed"
    done = _contraq("smooth", f"run={run}", f"out={out}", "epochs=3", "lr=0.01")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "smooth.json").read_text())
    assert summary["kept"] == 2 and summary["facts"] == 2
    assert [q["question"] for q in summary["questions"]] == ["Where is it?", "Who made it?"]
    assert summary["loss_last_epoch"] < summary["loss_first_epoch"]

    # The smoothed adapter loads as a run (what `contraq eval`/`sample` do) and makes the
    # kept questions more likely than a fresh LoRA does.
    smoothed = load_parts(resolve_run(out), device=torch.device("cpu"))
    fresh = Parts(cfg, with_lora=True)
    kept = [state["entries"][prompt_key(p)][0]["token_ids"] for p in prompts]
    with torch.no_grad():
        nll = [
            question_nll(m.policy, prompts, kept, m.sampler_cfg, tok.eos_token_id).item()
            for m in (smoothed, fresh)
        ]
    assert nll[0] < nll[1]

    again = _contraq("smooth", f"run={run}", f"out={out}")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"contraq smooth: {out}: already a run folder; choose another out="
    ]


def test_smooth_without_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    done = _contraq("smooth", f"run={tmp_path}", f"out={tmp_path / 'o'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"contraq smooth: {tmp_path / 'checkpoints'}: no checkpoint (train the run first)"
    ]
