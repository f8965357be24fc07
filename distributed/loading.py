"""Loading one stage from a checkpoint: only the files and tensors it keeps, all of them.

Every stage builds the model lazily with mlx-lm, finds its anatomy, cuts it to
its stage, and reads only what is left. Loading is strict where it matters: every
parameter the stage keeps must come from the checkpoint (mlx-lm's own loader, asked
for a part of a model, would leave a missing one at its random initial value), and
a tensor the model has no place for is an error too.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from distributed.anatomy import Anatomy, Unsupported, discover
from distributed.shard import Hops, Stage, kept_parts, layer_list, prune_to_stage

log = logging.getLogger(__name__)

# Files every stage needs from a hub repo before it knows its layers.
METADATA_PATTERNS = [
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
SHOWN = 8  # tensor names an error lists


def local_model_path(model: str) -> Path:
    """A local model directory, or the metadata files of a hub repo fetched into the HF cache."""
    path = Path(model)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=METADATA_PATTERNS))


def anatomy_of(model: nn.Module, config: dict) -> Anatomy:
    """`discover`, with the model type named in a refusal."""
    try:
        return discover(model)
    except Unsupported as err:
        raise Unsupported(f"model type {config.get('model_type')!r} cannot be split into stages: {err}") from None


def plan_model(path: Path) -> tuple[Anatomy, list[int]]:
    """The anatomy of the model at `path` and the bytes of each layer, from a skeleton
    built lazily from its config and whatever weight files are there (never evaluated;
    without the files, in the config's layer shapes unquantized, which weigh layers
    against each other alike)."""
    model, config = load_model(path, lazy=True, strict=False)
    anatomy = anatomy_of(model, config)
    return anatomy, [parameter_bytes(layer) for layer in layer_list(model, anatomy)]


def plan_anatomy(path: Path) -> Anatomy:
    return plan_model(path)[0]


def _part_of(name: str, parts: dict) -> Optional[str]:
    """The part a checkpoint tensor belongs to: its module path, or one of the two
    ending in the other (checkpoints and mlx-lm may differ by a prefix)."""
    module = name.rpartition(".")[0]
    for path in parts:
        if module == path or module.endswith("." + path) or path.endswith("." + module):
            return path
    return None


def stage_weight_files(weight_map: dict[str, str], stage: Stage, anatomy: Anatomy) -> set[str]:
    """The checkpoint files holding what `stage` keeps: its layers, by number, and the
    parts it keeps (`kept_parts`). A tensor outside the layers that no part claims goes
    to the first and last stages, which run what surrounds the layers."""
    layer = re.compile(rf"(?:^|\.){re.escape(anatomy.layers.rpartition('.')[2])}\.(\d+)\.")
    kept = kept_parts(anatomy, stage)
    files = set()
    for name, file in weight_map.items():
        match = layer.search(name)
        if match is not None:
            needed = stage.start <= int(match.group(1)) < stage.end
        else:
            part = _part_of(name, anatomy.parts)
            needed = part in kept if part is not None else stage.in_first_stage or stage.in_last_stage
        if needed:
            files.add(file)
    return files


def fetch_stage_weights(model: str, path: Path, stage: Stage, anatomy: Anatomy) -> None:
    """For a hub repo, download only the weight files that hold this stage's share."""
    from huggingface_hub import snapshot_download

    index_file = path / "model.safetensors.index.json"
    if not index_file.exists():
        snapshot_download(model, allow_patterns=["model*.safetensors"])
        return
    weight_map = json.loads(index_file.read_text())["weight_map"]
    files = stage_weight_files(weight_map, stage, anatomy)
    log.info("downloading %d of %d weight files", len(files), len(set(weight_map.values())))
    snapshot_download(model, allow_patterns=sorted(files))


def load_lazily(path: Path) -> tuple[nn.Module, dict, set[str]]:
    """mlx-lm's lazy load, and the names of the tensors it loaded (after the model's
    own sanitize), as the model class's `load_weights` is given them."""
    loaded: set[str] = set()

    def classes(config: dict):
        model_class, args_class = _get_classes(config)

        def load_weights(self, weights, strict=True):
            loaded.update(name for name, _ in weights)
            return model_class.load_weights(self, weights, strict=strict)

        recording = type(model_class.__name__, (model_class,), {"load_weights": load_weights})
        recording.__module__ = model_class.__module__
        return recording, args_class

    model, config = load_model(path, lazy=True, strict=False, get_model_classes=classes)
    return model, config, loaded


def _kept(name: str, anatomy: Anatomy, stage: Stage, parts: set[str]) -> bool:
    """Whether `stage` keeps parameter `name`: a layer's by number, a part's if it keeps
    the part, and the arrays of the modules holding the layers on every stage."""
    if name.startswith(anatomy.layers + "."):
        return stage.start <= int(name[len(anatomy.layers) + 1 :].split(".")[0]) < stage.end
    part = next((p for p in anatomy.parts if name.startswith(p + ".")), None)
    return part is None or part in parts


def _listed(names: set[str]) -> str:
    shown = sorted(names)[:SHOWN]
    return ", ".join(shown) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def check_checkpoint(model: nn.Module, anatomy: Anatomy, stage: Stage, loaded: set[str]) -> None:
    """ValueError naming the tensors the stage keeps that the checkpoint lacks, and the
    checkpoint's tensors the model has no place for."""
    names = {name for name, _ in tree_flatten(model.parameters())}
    parts = kept_parts(anatomy, stage)
    missing = {n for n in names - loaded if _kept(n, anatomy, stage, parts)}
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors layers {stage.start}-{stage.end - 1} "
                         f"need: {_listed(missing)}")
    extra = loaded - names
    if extra:
        raise ValueError(f"the checkpoint has {len(extra)} tensors the model has no place for: {_listed(extra)}")


def parameter_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def materialize(model: nn.Module, anatomy: Anatomy, stage: Stage) -> None:
    """Read this stage's weights from disk, with a progress line every quarter."""
    local = list(range(stage.start, stage.end))
    marks = {local[len(local) * q // 4 - 1] for q in range(1, 5)}
    layers = layer_list(model, anatomy)
    t0 = time.perf_counter()
    for i in local:
        mx.eval(layers[i].parameters())
        if i in marks:
            done = i - stage.start + 1
            log.info("loaded layer %d (%d/%d local layers, %.1fs)", i, done, len(local), time.perf_counter() - t0)
    mx.eval(model.parameters())


def load_stage(
    model: str, stage: Stage, hops: Hops, path: Optional[Path] = None, plan: Optional[Anatomy] = None
) -> tuple[nn.Module, dict, Anatomy]:
    """Build the model lazily, cut it to `stage` (its ring wrappers on `hops`), then read
    only what is left. `plan`, the anatomy from the config, picks a hub repo's files."""
    path = path or local_model_path(model)
    if not Path(model).exists():
        fetch_stage_weights(model, path, stage, plan or plan_anatomy(path))
    net, config, loaded = load_lazily(path)
    anatomy = anatomy_of(net, config)
    check_checkpoint(net, anatomy, stage, loaded)
    prune_to_stage(net, anatomy, stage, hops)
    materialize(net, anatomy, stage)
    log.info(
        "stage ready: layers %d-%d of %d, %.1f MB of parameters",
        stage.start,
        stage.end - 1,
        anatomy.count,
        parameter_bytes(net) / 2**20,
    )
    return net, config, anatomy


def load_stage_tokenizer(path: Path, config: dict):
    """The tokenizer, with the EOS ids the model config declares."""
    return load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
