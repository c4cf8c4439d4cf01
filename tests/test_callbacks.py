"""contraq.training.callbacks.build_callbacks: the callbacks group's `_target_` nodes,
instantiated; the ones a run folder needs are refused in one line when swapped out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar

from contraq.config.checks import ConfigError
from contraq.config.schema import compose_run
from contraq.training.callbacks import (
    AdapterCheckpoint,
    DDPAudit,
    DiskSpaceError,
    FreshSampleEval,
    SampleWriter,
    StepTimer,
    StopOnSignal,
    build_callbacks,
    bytes_needed,
    check_free_space,
    tensor_bytes,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _built(*overrides: str) -> dict[type, object]:
    cfg = compose_run(CONFIGS, ["output_dir=/tmp/contraq-cb", *overrides])
    return {type(c): c for c in build_callbacks(cfg)}


def test_default_callbacks_write_into_the_run_folder() -> None:
    built = _built("eval.every_n_steps=7", "eval.n_samples=3")
    ckpt = built[ModelCheckpoint]
    assert ckpt.dirpath == "/tmp/contraq-cb/checkpoints" and ckpt.save_last is True
    assert ckpt._every_n_train_steps == 10 and ckpt.save_top_k == 1
    adapter = built[AdapterCheckpoint]
    assert adapter.out_dir == Path("/tmp/contraq-cb/adapter") and adapter.every == 10
    assert built[SampleWriter].path == Path("/tmp/contraq-cb/samples.jsonl")
    fresh = built[FreshSampleEval]  # its interval and size come from the eval group
    assert (fresh.every, fresh.n, fresh.diversity) == (7, 3, True)
    assert built[StopOnSignal].ckpt_dir == Path("/tmp/contraq-cb/checkpoints")
    assert RichProgressBar in built and DDPAudit not in built
    # the step timer ends before the fresh-sample eval, so step_seconds leaves that eval out
    order = list(built)
    assert order.index(StepTimer) < order.index(FreshSampleEval)


def test_overrides_change_drop_and_swap_callbacks() -> None:
    built = _built(
        "callbacks.model_checkpoint.every_n_train_steps=5",  # the adapter follows it
        "~callbacks.sample_writer",
        "callbacks/progress_bar=tqdm",
        "+ddp_audit_dir=/tmp/contraq-cb/audit",
    )
    assert built[ModelCheckpoint]._every_n_train_steps == 5 and built[AdapterCheckpoint].every == 5
    assert SampleWriter not in built and RichProgressBar not in built
    assert TQDMProgressBar in built and DDPAudit in built
    assert not any(
        isinstance(c, RichProgressBar) for c in _built("~callbacks.progress_bar").values()
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "callbacks.sample_writer._target_=contraq.training.callbacks.Nope",
            "callbacks.sample_writer: cannot build",
        ),
        ("+callbacks.sample_writer.color=red", "callbacks.sample_writer: cannot build"),
        (
            "callbacks.stop_on_signal._target_=lightning.pytorch.callbacks.LearningRateMonitor"
            " ~callbacks.stop_on_signal.ckpt_dir",
            "callbacks.stop_on_signal: must build a StopOnSignal, got a LearningRateMonitor",
        ),
    ],
)
def test_a_callback_that_cannot_be_built_names_its_node(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _built(*override.split())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_checkpoint_is_written_only_when_its_size_and_the_margin_are_free() -> None:
    """Issue 28: a full disk failed a checkpoint write with the adapter already a step ahead.
    The decision, on plain numbers: the checkpoint (its tensors, or the previous file when
    larger), the adapter after it and the margin must fit in the free bytes."""
    state = {"state_dict": {"w": torch.zeros(10, 4)}, "optimizer_states": [{"m": torch.ones(3)}]}
    assert tensor_bytes(state) == 10 * 4 * 4 + 3 * 4 and tensor_bytes({"step": 3}) == 0
    assert bytes_needed(state=172, previous=0, adapter=100, margin=28) == 300
    assert bytes_needed(state=172, previous=500, adapter=100, margin=0) == 600
    check_free_space(Path("/runs/x/checkpoints"), needed=300, free=300)
    with pytest.raises(DiskSpaceError, match=r"checkpoints: 300 bytes needed .*, 299 free"):
        check_free_space(Path("/runs/x/checkpoints"), needed=300, free=299)
    # Lightning runs Checkpoint callbacks last in list order: the adapter after last.ckpt.
    built = list(_built("callbacks.adapter_checkpoint.free_margin_mb=0.5"))
    assert built.index(ModelCheckpoint) < built.index(AdapterCheckpoint)
    assert built[-1] is AdapterCheckpoint
    assert _built("callbacks.adapter_checkpoint.free_margin_mb=0.5")[AdapterCheckpoint].margin == (
        2**19
    )
