"""The base LM of an edit, and an edited model loaded back and checked against that base.

An edited model is one of: a `contraq edit` folder (``edit.json``: its editor, facts, base LM
settings, and for the fine-tuning editor its ``adapter/``); a peft adapter folder made
elsewhere (``adapter_config.json`` + ``adapter_model.safetensors``); a Hugging Face causal-LM
folder (``config.json`` + safetensors weights, e.g. written by ROME/MEMIT/EasyEdit). A folder
that does not fit the base (another architecture, other shapes, another tokenizer) is refused
with one line naming what differs, before anything answers with it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from contraq.config.schema import load_group
from contraq.errors import UserError
from contraq.lm.models import ModelConfig, load_model_and_tokenizer
from contraq.run.load import load_run_config, resolve_run

EDIT_JSON = "edit.json"
ADAPTER_DIR = "adapter"
FACTS_FILE = "facts.jsonl"
# The architecture a folder must share with the base LM (transformers' common config names).
ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


class EditedModelError(UserError, ValueError):
    """An edited model that cannot be used with this base (the message names the folder)."""


def base_groups(cfg: DictConfig) -> DictConfig:
    """The ``model``, ``reward`` and ``nli`` groups of a command: those of the run folder named
    by ``base=`` when set, else the command's own (``configs/<cmd>.yaml`` defaults)."""
    if cfg.get("base"):
        return load_run_config(resolve_run(str(cfg.base)).run_dir)
    return cfg


def model_settings(groups: DictConfig) -> ModelConfig:
    return load_group(groups, "model", ModelConfig)


@dataclass
class Edited:
    """An edited model ready to answer.

    Attributes:
        lm: the model that answers (the base LM itself for the in-context editor).
        tokenizer: the base LM's tokenizer.
        kind: ``ft``, ``in_context``, ``adapter`` (peft, made elsewhere) or ``hf`` (a folder).
        where: the folder (or ``in_context``), for messages.
        context: the in-context template (``{edit_fact}`` is replaced), else ``None``.
        cases: the edit's facts (:class:`contraq.editing.dataset.EditCase`) when the folder
            records them, else ``None``.
        base: a separate base LM (``hf`` only: peft models disable their adapter instead).
    """

    lm: nn.Module
    tokenizer: Any
    kind: str
    where: str
    model_cfg: ModelConfig
    context: str | None = None
    cases: list[Any] | None = None
    base: nn.Module | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def base_lm(self) -> Iterator[nn.Module]:
        """The unedited base LM (locality compares against it)."""
        if self.base is not None:
            yield self.base
        elif hasattr(self.lm, "disable_adapter"):
            with self.lm.disable_adapter():
                yield self.lm
        else:
            yield self.lm


def _vocab_differs(folder: Path, tokenizer: Any) -> str | None:
    """Why the folder's tokenizer differs from the base's (``None``: same, or none there)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    ours = tokenizer.get_vocab()
    if theirs == ours:
        return None
    only = sorted(set(theirs) - set(ours))[:3]
    return (
        f"its tokenizer differs from the base's ({len(theirs)} vs {len(ours)} tokens; e.g. {only})"
    )


def _module_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear-like module (GPT-2's Conv1D stores the weight
    transposed), else ``None``."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _lora_misfit(name: str, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> str | None:
    """Why one LoRA tensor of an adapter file cannot sit on the base LM (``None``: it fits)."""
    for kind in ("lora_A", "lora_B"):
        if f".{kind}." not in name:
            continue
        path = name.split(f".{kind}.")[0].removeprefix("base_model.model.")
        module = modules.get(path)
        if module is None:
            return f"tensor {name}: the base LM has no module {path!r}"
        dims = _module_shape(module)
        if dims is None:
            return None
        want, got = (dims[0], shape[1]) if kind == "lora_A" else (dims[1], shape[0])
        if want != got:
            return f"tensor {name} {list(shape)} does not fit {path} ({dims[0]} -> {dims[1]})"
    return None


def check_adapter(folder: Path, base: nn.Module, tokenizer: Any) -> None:
    """Refuse a peft adapter folder that does not fit ``base`` (pickled weights, a module the
    base lacks, a shape that differs, another tokenizer). Raises :class:`EditedModelError`."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise EditedModelError(
            f"{folder}: no adapter_model.safetensors (only safetensors adapters are read)"
        )
    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as fh:
        for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            why = _lora_misfit(name, tuple(fh.get_slice(name).get_shape()), modules)
            if why:
                raise EditedModelError(f"{folder}: an adapter for another base LM: {why}")
    why = _vocab_differs(folder, tokenizer)
    if why:
        raise EditedModelError(f"{folder}: {why}")


def check_hf_folder(folder: Path, base: nn.Module, tokenizer: Any) -> None:
    """Refuse a Hugging Face folder whose architecture or tokenizer differs from the base's,
    or whose weights are not safetensors. Raises :class:`EditedModelError`."""
    from transformers import AutoConfig

    if not any(folder.glob("*.safetensors")):
        raise EditedModelError(f"{folder}: no *.safetensors weights (pickled weights are not read)")
    theirs = AutoConfig.from_pretrained(str(folder))
    ours = base.config
    for key in ARCH_KEYS:
        a, b = getattr(theirs, key, None), getattr(ours, key, None)
        if a != b:
            raise EditedModelError(
                f"{folder}: not an edit of the base LM: config {key}={a!r}, the base has {b!r}"
            )
    why = _vocab_differs(folder, tokenizer)
    if why:
        raise EditedModelError(f"{folder}: {why}")


def load_base(mcfg: ModelConfig, device: Any) -> tuple[nn.Module, Any]:
    model, tok = load_model_and_tokenizer(mcfg)
    return model.to(device).eval(), tok


def load_adapter(folder: Path, mcfg: ModelConfig, device: Any, kind: str) -> Edited:
    """The base LM with a peft adapter on it, checked first."""
    from peft import PeftModel

    base, tok = load_base(mcfg, device)
    check_adapter(folder, base, tok)
    try:
        lm = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0][:200]
        raise EditedModelError(
            f"{folder}: peft cannot load this adapter on the base: {first}"
        ) from None
    return Edited(lm.to(device).eval(), tok, kind, str(folder), mcfg)


def load_hf_folder(folder: Path, mcfg: ModelConfig, device: Any) -> Edited:
    """A whole edited model from a Hugging Face folder, checked against the base (kept for
    locality)."""
    from transformers import AutoModelForCausalLM

    from contraq.lm.models import disable_dropout

    base, tok = load_base(mcfg, device)
    check_hf_folder(folder, base, tok)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=mcfg.torch_dtype)
    disable_dropout(lm)
    return Edited(lm.to(device).eval(), tok, "hf", str(folder), mcfg, base=base)


def read_edit_json(folder: Path) -> dict[str, Any]:
    path = folder / EDIT_JSON
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EditedModelError(f"{path}: cannot read the edit record ({exc})") from None
    if not isinstance(record, dict) or "editor" not in record or "model" not in record:
        raise EditedModelError(f"{path}: not a contraq edit record (no editor/model)")
    return record


def load_edited(where: str, mcfg: ModelConfig, device: Any, context: str, facts_of: Any) -> Edited:
    """The edited model ``where`` names: ``in_context`` (``mcfg`` answers with ``context``
    before each question), a `contraq edit` folder (its recorded base, facts and editor), a
    peft adapter folder or a Hugging Face folder (on ``mcfg``'s base LM). ``facts_of(path)``
    loads a facts file (its edit cases)."""
    if where == "in_context":
        base, tok = load_base(mcfg, device)
        return Edited(base, tok, "in_context", where, mcfg, context=context)
    folder = Path(where).expanduser()
    if not folder.is_dir():
        raise EditedModelError(f"edited={where}: no such folder (or use edited=in_context)")
    if (folder / EDIT_JSON).is_file():
        record = read_edit_json(folder)
        rec_cfg = load_group(OmegaConf.create({"model": record["model"]}), "model", ModelConfig)
        if record["editor"] == "in_context":
            edited = load_edited("in_context", rec_cfg, device, record["context"], facts_of)
        else:
            inner = Path(record.get("path") or folder / ADAPTER_DIR)
            edited = load_edited(str(inner), rec_cfg, device, context, facts_of)
        edited.kind, edited.where, edited.record = record["editor"], str(folder), record
        edited.cases = facts_of(folder / FACTS_FILE)
        return edited
    if (folder / "adapter_config.json").is_file():
        return load_adapter(folder, mcfg, device, "adapter")
    if (folder / "config.json").is_file():
        return load_hf_folder(folder, mcfg, device)
    raise EditedModelError(
        f"edited={where}: neither a contraq edit folder (edit.json), a peft adapter "
        "(adapter_config.json) nor a Hugging Face folder (config.json)"
    )


def model_record(mcfg: ModelConfig) -> dict[str, Any]:
    """The base LM settings as edit.json records them."""
    return asdict(mcfg)


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
