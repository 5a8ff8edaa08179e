"""Load and save realflow models as plain HF checkpoint directories.

    model, tokenizer = load_hf("ckpt/actor", head="lm", dtype=torch.float32)
    critic, _ = init_from_actor("ckpt/actor", head="critic", seed=1)   # fresh value head
    save_hf(model, "runs/x/checkpoints/actor", tokenizer=tokenizer)

A saved directory (config.json, safetensors, tokenizer) loads in transformers as
`*ForCausalLM` (lm), `*ForTokenClassification` (critic) or `*ForSequenceClassification` (reward),
each with num_labels=1, and gives the same logits / values / scores, also for batches the saved
tokenizer pads: a reward model is saved with a pad token that is not EOS (`tokenizer_for_export`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import torch

from realflow.models.config import TransformerConfig
from realflow.models.families.base import (
    StateDict,
    check_head,
    family_for_config,
    family_for_hf_config,
)
from realflow.models.transformer import PackedTransformer

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
EMBED = "embed_tokens.weight"  # the token embedding in realflow's state dict
# config.json key: how many embedding rows save_hf appended so that every id of the saved
# tokenizer (a reward model's new pad token, see tokenizer_for_export) has one; load_hf drops
# them again, so training resumes in the trained shape.
ADDED_PAD_ROWS = "realflow_added_pad_rows"
# Names tried, in order, for a pad token added on export.
EXPORT_PAD_TOKENS = ("<|pad|>", "<|realflow_pad|>", "[PAD]")
# Keys of an HF config.json that describe a head or a saved file, not the architecture.
_HEAD_KEYS = (
    "architectures", "id2label", "label2id", "num_labels", "problem_type",
    "transformers_version", "_name_or_path", "torch_dtype", "dtype", ADDED_PAD_ROWS,
)  # fmt: skip


class LoadedHF(NamedTuple):
    model: PackedTransformer
    tokenizer: Any | None


# --------------------------------------------------------------------------------- reading


_DAMAGED = "copy or download the checkpoint again (an interrupted download or copy?)"


def _read_json(file: Path) -> dict:
    """A JSON object file of a checkpoint; ValueError names the file when it is damaged."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: is not valid JSON ({e}); {_DAMAGED}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}; {_DAMAGED}")
    return data


def _load_weights_file(file: Path, index: Path | None = None) -> StateDict:
    """The tensors of one .safetensors or .bin file (`index` lists it, for a missing shard)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"{file}: is missing (listed in {index}); {_DAMAGED}")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except SafetensorError as e:
            raise ValueError(
                f"{file}: is not a readable safetensors file ({e}); {_DAMAGED}"
            ) from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).split(". ")[0]  # torch appends a paragraph of advice
        raise ValueError(f"{file}: cannot be read by torch.load ({first}); {_DAMAGED}") from None


def _shard_files(path: Path, index_name: str) -> list[Path]:
    """The shard files a sharded checkpoint's index lists, in name order."""
    index = _read_json(path / index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / index_name}: has no 'weight_map' object; {_DAMAGED}")
    return [path / shard for shard in sorted(set(weight_map.values()))]


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of an HF directory as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file() and (Path(path) / "adapter_config.json").is_file():
        raise ValueError(
            f"{path} is a peft adapter directory, not a model: give the base model it names "
            "in adapter_config.json (base_model_name_or_path), or the merged model (its "
            "merged/ directory, saved with <role>.save_merged=true)"
        )
    if not file.is_file():
        raise ValueError(f"{path} is not an HF checkpoint directory: no config.json")
    return _read_json(file)


def config_from_hf_dir(path: str | os.PathLike) -> TransformerConfig:
    """The realflow config of an HF checkpoint directory (its family found from config.json)."""
    hf = read_hf_config(path)
    return family_for_hf_config(hf).config_from_hf(hf)


def read_hf_state_dict(path: str | os.PathLike) -> StateDict:
    """All tensors of an HF directory: safetensors (single or sharded) or pytorch_model*.bin."""
    path = Path(path)
    for single, index in (("model.safetensors", SAFE_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        if (path / single).is_file():
            return _load_weights_file(path / single)
        if (path / index).is_file():
            sd: StateDict = {}
            for shard in _shard_files(path, index):
                sd.update(_load_weights_file(shard, index=path / index))
            return sd
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise ValueError(
        f"no weights in {path}: expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or "
        f"{BIN_INDEX}; found {found}"
    )


def stored_dtype(hf: dict, sd: StateDict) -> torch.dtype:
    """The dtype of a checkpoint: config.json's `dtype` (or `torch_dtype`), else that of most of
    its floating tensors, else float32."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name:
        return _resolve_dtype(name, hf)
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _resolve_dtype(dtype: torch.dtype | str | None, hf: dict) -> torch.dtype:
    if dtype is None:
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
        return resolved
    return dtype


def load_hf(
    path: str | os.PathLike,
    head: str = "lm",
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    head_init_seed: int | None = None,
    load_tokenizer: bool = True,
    **config_overrides,
) -> LoadedHF:
    """A PackedTransformer (and the tokenizer, when the directory has one) from an HF directory.

    `dtype` defaults to the checkpoint's dtype (config.json's, else that of its tensors). Head
    parameters the checkpoint lacks (a critic loaded from an actor) are an error unless
    `head_init_seed` is given, which initialises them deterministically. `config_overrides` set
    run options such as `attn_impl`, `gradient_checkpointing` or `autocast_dtype`.
    """
    check_head(head)
    hf = read_hf_config(path)
    family = family_for_hf_config(hf)
    config = family.config_from_hf(hf)
    if config_overrides:
        config = config.replace(**config_overrides)
    stored = read_hf_state_dict(path)
    dtype = stored_dtype(hf, stored) if dtype is None else _resolve_dtype(dtype, hf)
    sd = family.state_dict_from_hf(stored, config, head)
    sd, config = _drop_added_pad_rows(sd, config, int(hf.get(ADDED_PAD_ROWS, 0)))
    model = _build_with_state(config, head, sd, dtype, torch.device(device), head_init_seed, path)
    tokenizer = load_tokenizer_if_present(path) if load_tokenizer else None
    logger.info(
        "loaded %s (%s, head=%s, %s) from %s", family.name, config.family, head, dtype, path
    )
    return LoadedHF(model, tokenizer)


def init_from_actor(
    path: str | os.PathLike,
    head: str = "critic",
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> LoadedHF:
    """A critic or reward model whose body comes from a causal-LM checkpoint and whose head is
    freshly initialised from `seed` (weights ~ N(0, initializer_range), bias 0)."""
    if head == "lm":
        raise ValueError(
            "init_from_actor builds a critic or reward model; use load_hf for head='lm'"
        )
    return load_hf(path, head, dtype, device, head_init_seed=seed, **config_overrides)


def _build_with_state(
    config: TransformerConfig,
    head: str,
    sd: StateDict,
    dtype: torch.dtype,
    device: torch.device,
    head_init_seed: int | None,
    path: Any,
) -> PackedTransformer:
    """Build on the meta device, then assign the checkpoint tensors (no wasted random init)."""
    with torch.device("meta"):
        model = PackedTransformer(config, head)
    expected = dict(model.named_parameters(remove_duplicate=False))
    if config.tie_word_embeddings and "lm_head.weight" in expected and "embed_tokens.weight" in sd:
        sd = {**sd, "lm_head.weight": sd["embed_tokens.weight"]}
    missing = [k for k in expected if k not in sd]
    head_names = set(model.parameter_groups()["head"])
    if missing and (head_init_seed is None or not set(missing) <= head_names):
        hint = (
            " (the checkpoint has no weights for this head: use init_from_actor or head_init_seed)"
            if set(missing) <= head_names
            else ""
        )
        raise ValueError(f"checkpoint {path} is missing parameters {missing[:10]}{hint}")
    gen = torch.Generator().manual_seed(head_init_seed) if missing else None
    for name in missing:
        shape = expected[name].shape
        if name.endswith("bias"):
            sd[name] = torch.zeros(shape)
        else:
            sd[name] = torch.empty(shape).normal_(0.0, config.initializer_range, generator=gen)
        logger.info("initialised %s %s from seed %d", name, tuple(shape), head_init_seed)
    # copy=True: parameters in memory of their own, never views into the checkpoint's buffer.
    # Views start at unaligned addresses, and CPU kernels then sum in another order: a run resumed
    # from a checkpoint drifted (1e-8) from the uninterrupted one.
    sd = {k: v.to(device=device, dtype=dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _drop_added_pad_rows(
    sd: StateDict, config: TransformerConfig, rows: int
) -> tuple[StateDict, TransformerConfig]:
    """The state dict and config without the `rows` embedding rows save_hf appended."""
    if rows <= 0:
        return sd, config
    vocab = config.vocab_size - rows
    return {**sd, EMBED: sd[EMBED][:vocab]}, config.replace(vocab_size=vocab)


def load_tokenizer_if_present(path: str | os.PathLike) -> Any | None:
    """`transformers.AutoTokenizer` of the directory, or None when it holds no tokenizer files."""
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------- writing


def tokenizer_for_export(model: PackedTransformer, tokenizer: Any | None) -> Any | None:
    """The tokenizer to save with `model`: `tokenizer` itself, or for a reward model whose pad
    token is missing or an EOS id, a copy with a new pad token ('<|pad|>').

    HF `*ForSequenceClassification` reads the score at the last token that is not
    `pad_token_id`; realflow reads it at the last token, usually EOS. With pad == EOS (what
    `load_tokenizer` gives a tokenizer without a pad token, and qwen2's own choice) HF would read
    the token before EOS. The new token takes the first id past the tokenizer; when the model has
    no row for it, save_hf appends one (zeros: pad positions come after the real tokens and are
    masked out, so the row is never read).
    """
    if tokenizer is None or model.head != "reward" or not hasattr(tokenizer, "get_vocab"):
        return tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = {*model.config.eos_token_ids, getattr(tokenizer, "eos_token_id", None)}
    if pad is not None and pad not in eos:
        return tokenizer
    vocab = tokenizer.get_vocab()
    name = next((t for t in EXPORT_PAD_TOKENS if t not in vocab), None)
    if name is None:
        raise ValueError(f"cannot add a pad token: {EXPORT_PAD_TOKENS} are all in the vocabulary")
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"pad_token": name})
    logger.info(
        "saving the reward model with a new pad token %r (id %d): its pad (%s) is missing or "
        "an EOS id, and HF sequence classification would read the score before EOS",
        name, tokenizer.pad_token_id, pad,
    )  # fmt: skip
    return tokenizer


def export_vocab_size(model: PackedTransformer, tokenizer: Any | None) -> int:
    """vocab_size of the saved model: the model's, or for critic and reward heads enough rows
    for every id of the saved tokenizer (its pad token may be new)."""
    n = model.config.vocab_size
    if tokenizer is None or model.head == "lm" or not hasattr(tokenizer, "get_vocab"):
        return n
    return max(n, max(tokenizer.get_vocab().values()) + 1)


def hf_config_for(
    model: PackedTransformer, dtype: torch.dtype, tokenizer: Any | None = None
) -> dict:
    """The config.json dict that makes transformers build the same model with the same head
    (`tokenizer`: the one saved with it, see tokenizer_for_export)."""
    config, head = model.config, model.head
    family = family_for_config(config)
    vocab = export_vocab_size(model, tokenizer)
    hf = {k: v for k, v in config.extra_hf.items() if k not in _HEAD_KEYS}
    hf.update(family.config_to_hf(config.replace(vocab_size=vocab)))
    if vocab > config.vocab_size:
        hf[ADDED_PAD_ROWS] = vocab - config.vocab_size
    hf["architectures"] = [family.architectures[head]]
    hf["dtype"] = str(dtype).removeprefix("torch.")
    if head != "lm":
        hf["id2label"] = {"0": "LABEL_0"}
        hf["label2id"] = {"LABEL_0": 0}
    if head == "reward":
        # HF scores the last token that is not pad: the id the saved tokenizer pads with.
        if getattr(tokenizer, "pad_token_id", None) is not None:
            hf["pad_token_id"] = tokenizer.pad_token_id
        pad = hf.get("pad_token_id")
        if pad is None:
            logger.warning(
                "saving a reward model without pad_token_id: HF *ForSequenceClassification can "
                "then only score batches of one sequence"
            )
        elif pad in config.eos_token_ids:
            logger.warning(
                "reward model pad_token_id (%d) is an EOS id: HF reads the score at the last "
                "non-pad token, realflow at the last token; they differ for sequences ending in EOS",
                pad,
            )
    return hf


def save_hf(
    model: PackedTransformer,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    dtype: torch.dtype | str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: StateDict | None = None,
) -> Path:
    """Write `model` (and `tokenizer`) as an HF directory at `path`; returns the path.

    `state_dict` (realflow names) gives the weights to write instead of the module's own: a
    train engine's full fp32 master weights, e.g. under deepspeed ZeRO-3, whose module holds
    empty partitions. Its names and shapes must be those of the model's config. `dtype`
    defaults to that of the weights written.

    Everything is written into a temporary sibling directory first and renamed into place, so a
    failure never leaves half a checkpoint. An existing HF checkpoint (or empty directory) at
    `path` is replaced; any other existing non-empty directory or file is an error.
    """
    if not isinstance(model, PackedTransformer):
        raise TypeError(f"save_hf needs a PackedTransformer, got {type(model).__name__}")
    if (
        tokenizer is not None
        and not hasattr(tokenizer, "save_pretrained")
        and not hasattr(tokenizer, "save")
    ):
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has neither save_pretrained nor save"
        )
    path = Path(path)
    _check_target(path)
    sd = {
        k: v.detach() for k, v in (model.state_dict() if state_dict is None else state_dict).items()
    }
    _check_shapes(model, sd)
    first_param = next(name for name, _ in model.named_parameters())
    dtype = _resolve_dtype(dtype, {"dtype": str(sd[first_param].dtype).removeprefix("torch.")})
    family = family_for_config(model.config)
    tokenizer = tokenizer_for_export(model, tokenizer)
    hf_config = hf_config_for(model, dtype, tokenizer)
    sd, config = _with_vocab_rows(sd, model.config, hf_config["vocab_size"])
    hf_sd = family.state_dict_to_hf(sd, config, model.head)
    bad = [k for k, v in hf_sd.items() if not v.is_floating_point()]
    if bad:
        raise ValueError(f"non-floating parameters cannot be saved: {bad[:5]}")
    hf_sd = {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in hf_sd.items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if model.head == "lm":
            gen = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_safetensors(hf_sd, tmp, max_shard_bytes)
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            else:
                tokenizer.save(str(tmp / "tokenizer.json"))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved %s (head=%s, %s) to %s", family.name, model.head, dtype, path)
    return path


def _check_shapes(model: PackedTransformer, sd: StateDict) -> None:
    """The weights must have the names and shapes the model's config gives (an empty ZeRO-3
    partition, shape (0,), is the usual culprit)."""
    with torch.device("meta"):
        expected = PackedTransformer(model.config, model.head).state_dict()
    bad = {
        k: (tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    }
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if bad or missing or extra:
        raise ValueError(
            "cannot save weights that do not match the model config: "
            + "; ".join(
                [f"{k} has shape {got}, config says {want}" for k, (got, want) in bad.items()][:5]
                + ([f"missing {missing[:5]}"] if missing else [])
                + ([f"unexpected {extra[:5]}"] if extra else [])
            )
            + (
                " (empty shapes: ZeRO-3 partitions; save the engine's gathered weights)"
                if any(got == (0,) for got, _ in bad.values())
                else ""
            )
        )


def _with_vocab_rows(
    sd: StateDict, config: TransformerConfig, vocab: int
) -> tuple[StateDict, TransformerConfig]:
    """The state dict and config with zero embedding rows appended up to `vocab`."""
    extra = vocab - config.vocab_size
    if extra <= 0:
        return sd, config
    embed = sd[EMBED]
    rows = embed.new_zeros((extra, embed.shape[1]))
    return {**sd, EMBED: torch.cat([embed, rows])}, config.replace(vocab_size=vocab)


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot save a checkpoint to {path}: it exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise ValueError(
            f"cannot save a checkpoint to {path}: it is a non-empty directory that is not an HF "
            "checkpoint (refusing to replace it)"
        )


def _write_safetensors(hf_sd: StateDict, out: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[StateDict] = [{}]
    size = 0
    for name, t in hf_sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in hf_sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside first and deleted after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
