"""LoRA adapters on medstate models, through Hugging Face PEFT, with nothing dropped silently.

    add_lora(model, LoraSettings(targets=["in_proj", "out_proj"], rank=16, alpha=32, dropout=0.1), base=path)
    save_adapter(model, directory)      # PEFT's own format: adapter_config.json + adapter_model.safetensors
    load_adapter(directory, load_base)  # the base model (adapter_config's base_model_name_or_path) + the adapters
    merge_lora(model)                   # the adapters folded into the weights: a plain model, saved in the HF layout

Targets are module names: `in_proj` matches every module whose name is `in_proj` or ends in `.in_proj`; a target
starting with `re:` is a regular expression over the whole module name (`re:backbone\\.layers\\.[0-3]\\..*in_proj`).
Every target must match at least one module, and only modules whose weight the model reads through the module's
own forward can be adapted (`nn.Linear`, `nn.Embedding`): a depthwise convolution whose weight the scan kernels
read directly (Mamba's conv1d) is refused rather than left silently untrained, and medstate's fused paths (the
RMSNorm + in_proj op on the CPU, the dt projection) fall back to calling the module when it is adapted.

Modules listed in `modules_to_save` (PEFT's name; e.g. a new task head such as EhrMamba's classifier) are trained
whole beside the adapters and saved with them.

A head tied to the token embeddings stays tied while adapters are trained (each adapter acts on its own module's
output), and is untied when merging if the head or the embeddings are adapted, so that the merged model computes
exactly what the adapted one did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from medstate.errors import MedstateError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")  # Mamba-1 has all four, Mamba-2 in_proj and out_proj
_PREFIX = "base_model.model."  # how PeftModel names the weights it saves


@dataclass
class LoraSettings:
    targets: list[str] = field(default_factory=list)  # empty: every projection the model has (PROJECTIONS)
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.1
    modules_to_save: list[str] = field(default_factory=list)  # trained whole and saved with the adapters

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise MedstateError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {self}")


def _peft():
    try:
        import peft
    except ImportError:
        raise MedstateError("LoRA needs Hugging Face PEFT: pip install peft") from None
    return peft


def _matching(names: dict[str, nn.Module], target: str, what: str) -> list[str]:
    """The module names a target selects (a name suffix, or `re:` over the whole name); none is an error."""
    if target.startswith("re:"):
        try:
            pattern = re.compile(target[3:])
        except re.error as err:
            raise MedstateError(f"{what} {target!r} is not a regular expression ({err})") from None
        matched = [n for n in names if pattern.fullmatch(n)]
    else:
        matched = [n for n in names if n == target or n.endswith("." + target)]
    if not matched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in names.items() if not list(m.children())})
        raise MedstateError(f"{what} {target!r} matches no module of the model (module names end in: "
                            f"{', '.join(leaves)})")  # fmt: skip
    return matched


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The full names of the modules the targets select; an error names a target that selects nothing, or a module
    that cannot be adapted."""
    names = {name: module for name, module in model.named_modules() if name}
    if not targets:
        targets = [t for t in PROJECTIONS if any(n == t or n.endswith("." + t) for n in names)]
    chosen: dict[str, None] = {}
    for target in targets:
        for name in _matching(names, target, "LoRA target"):
            module = names[name]
            if type(module) not in (nn.Linear, nn.Embedding):
                raise MedstateError(
                    f"LoRA target {target!r} selects {name}, a {type(module).__name__}: only Linear and Embedding "
                    "layers can be adapted (a depthwise convolution's weight is read by the scan kernels directly)"
                )
            chosen[name] = None
    return list(chosen)


def _saved_modules(model: nn.Module, patterns: list[str], adapted: list[str]) -> list[str]:
    """The full names `modules_to_save` selects; a module that is also adapted, or inside one, is an error."""
    names = {name: module for name, module in model.named_modules() if name}
    chosen = list(dict.fromkeys(n for pattern in patterns for n in _matching(names, pattern, "modules_to_save")))
    clash = [n for n in chosen for a in adapted if a == n or a.startswith(n + ".") or n.startswith(a + ".")]
    if clash:
        raise MedstateError(f"{clash[0]} is both adapted by LoRA and in modules_to_save: choose one")
    return chosen


def _set_trainable(model: nn.Module, saved: list[str]) -> None:
    """The adapters and the saved modules train; every other parameter is frozen."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or any(name.startswith(m + ".") for m in saved))


def add_lora(model: nn.Module, settings: LoraSettings, base: str | Path | None = None) -> nn.Module:
    """Adapters on the targeted modules, in place; every other parameter is frozen. `base` (the checkpoint the
    model was loaded from) is written into the adapter's config, so that `load_adapter` finds it."""
    peft = _peft()
    if has_lora(model):
        raise MedstateError("the model already has LoRA adapters; merge them first (merge_lora)")
    names = resolve_targets(model, settings.targets)
    saved = _saved_modules(model, settings.modules_to_save, names)
    config = peft.LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names,
        base_model_name_or_path=None if base is None else str(base),
    )  # fmt: skip
    peft.inject_adapter_in_model(config, model)
    config.modules_to_save = saved or None  # set after injection: PEFT would wrap them (we train them in place)
    _set_trainable(model, saved)
    model.lora_config, model.lora_base = config, None if base is None else str(base)
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """The adapters in PEFT's format (`peft.PeftModel.from_pretrained(base, directory)` loads them)."""
    from safetensors.torch import save_file

    peft = _peft()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.lora_config.save_pretrained(directory)
    weights = peft.get_peft_model_state_dict(model, save_embedding_layers=False)  # the adapters, not the base
    for name in model.lora_config.modules_to_save or []:  # under their own names, as PEFT saves them
        weights.update({f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()})
    save_file({_PREFIX + k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / ADAPTER_WEIGHTS)
    return directory


def load_adapter(directory: str | Path, load_base: Callable[[Path], nn.Module]) -> nn.Module:
    """The base model named in the adapter's config, loaded with `load_base`, with the adapters on it."""
    from safetensors.torch import load_file

    peft = _peft()
    directory = Path(directory)
    settings = json.loads((directory / ADAPTER_CONFIG).read_text())
    base = settings.get("base_model_name_or_path")
    if not base:
        raise MedstateError(f"{directory / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    base_path = Path(base) if Path(base).is_absolute() else (directory / base)
    if not base_path.is_dir():
        raise MedstateError(f"{directory}: its base model {base} is not a local directory")
    model = load_base(base_path.resolve())
    config = peft.LoraConfig.from_pretrained(directory)
    saved = list(config.modules_to_save or [])
    config.modules_to_save = None
    peft.inject_adapter_in_model(config, model)
    config.modules_to_save = saved or None
    weights = {k.removeprefix(_PREFIX): v for k, v in load_file(directory / ADAPTER_WEIGHTS).items()}
    whole = {k: weights.pop(k) for k in list(weights) if any(k.startswith(m + ".") for m in saved)}
    result = peft.set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    for name in saved:
        prefix = name + "."
        found = {k.removeprefix(prefix): v for k, v in whole.items() if k.startswith(prefix)}
        module_result = model.get_submodule(name).load_state_dict(found, strict=False)
        missing += [prefix + k for k in module_result.missing_keys]
    if missing or result.unexpected_keys:
        raise MedstateError(f"{directory}: adapter weights do not fit the base model (missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})")  # fmt: skip
    _set_trainable(model, saved)
    model.lora_config, model.lora_base = config, str(base_path.resolve())
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """The adapters folded into their modules' weights and removed, in place: a plain model with every parameter
    trainable again. A tied head whose head or embeddings were adapted is untied first (config updated)."""
    from peft.tuners.lora import LoraLayer

    if not has_lora(model):
        return model
    adapted = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if _tied(model) and any(n.endswith(("lm_head", "embeddings")) for n in adapted):
        head = _base(model.lm_head)
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_embeddings = False
    for name in adapted:
        module = model.get_submodule(name)
        module.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.lora_config = None
    return model


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, load: Callable[[Path], nn.Module]) -> Path:
    """An adapter directory loaded with `load` (a loader that reads adapter directories), merged, and saved to
    `out_dir` as a plain checkpoint. Returns the base model's directory (for the files that travel with it)."""
    adapter_dir = Path(adapter_dir)
    if not is_adapter(adapter_dir):
        raise MedstateError(f"{adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    model = load(adapter_dir)
    base = Path(model.lora_base)
    merge_lora(model).save_pretrained(out_dir)
    return base


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _tied(model: nn.Module) -> bool:
    """Whether the model's head shares its weight with the token embeddings."""
    head = getattr(model, "lm_head", None)
    embeddings = getattr(getattr(model, "backbone", None), "embeddings", None)
    if head is None or embeddings is None:
        return False
    return _base(head).weight is _base(embeddings).weight
