"""Loading models: an embedded model (``registry.json``: Gemma 3 270M, Qwen2.5-Coder 0.5B / 1.5B, converted once from
their GGUF packages to a cached bf16 folder), any Hugging Face causal LM (hub id or local dir), a local GGUF file,
and a LoRA adapter applied unmerged (peft) or merged (in fp32, then cast: merging in bf16 rounds away a small
adapter's change).

``model_identity(cfg)`` is what a fingerprint records of a model: content hashes (the registry's sha256, a GGUF
file's or a folder's, an adapter's), never a file name.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from qtalign.engine.gguf import CONVERTER_VERSION, check_gguf, converted_dir, ensure_converted
from qtalign.engine.registry import embedded, embedded_names, verify_file
from qtalign.errors import QtalignError
from qtalign.io import cache_root, dir_sha256, file_sha256
from qtalign.limits import SETTINGS

DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPE_NAMES[name])


class ModelConfig(BaseModel):
    """Which model to load and how."""

    model_config = SETTINGS

    name: str = Field("gemma-3-270m", description="an embedded model (gemma-3-270m, qwen2.5-coder-0.5b, "
                      "qwen2.5-coder-1.5b: `qtalign models`), a hub id, a local HF dir, or a .gguf file")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name` (a dir or hub repo)")
    adapter: str | None = Field(None, description="LoRA adapter dir (peft); applied unmerged unless merge_adapter")
    merge_adapter: bool = Field(False, description="merge the adapter into the weights (done in fp32)")
    dtype: Literal["bf16", "fp32", "fp16"] = Field("bf16", description="weight/compute dtype")
    load_in_4bit: bool = Field(False, description="NF4 quantisation via bitsandbytes (CUDA only)")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the hub (runs that code: "
                                    "a warning is printed)")
    revision: str | None = Field(None, description="hub revision")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    device_map: Literal["auto"] | None = Field(None, description="'auto': spread a model too large for one device over "
                                               "every GPU (then CPU memory) with accelerate; one process (docs/scale.md)")
    compile: bool = Field(False, description="fuse the element-wise work around the matrix products (norms, the MLP) with "
                          "torch.compile: faster inference after a warm-up of 10-30 s, scores within bf16 rounding of the "
                          "eager ones (a different model identity: results are stored apart)")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v):
        return {"name": v} if isinstance(v, str) else v  # `model: gemma-3-270m` is the model's name

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"unknown device {v!r} (auto, cpu, cuda, cuda:N)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty model name")
        return v

    @model_validator(mode="after")
    def _merge_4bit(self):
        if self.merge_adapter and self.load_in_4bit:
            raise ValueError(MERGE_4BIT)
        return self


# what to do instead of merging a LoRA adapter into NF4 weights (which peft cannot do exactly)
MERGE_4BIT = ("a LoRA adapter cannot be merged into a base loaded in 4 bits (load_in_4bit): evaluate it unmerged on the "
              "4-bit base (--adapter without --merge-adapter), or merge it into the full-precision base "
              "(--no-load-in-4bit; as QLoRA merges do, the adapter then applies to unquantised weights)")


def device_type(name: str) -> str:
    """'cpu' or 'cuda': what decides the numerics of a result (part of the store's keys)."""
    return _device(name).split(":")[0]


def _device(name: str) -> str:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QtalignError(f"device '{name}': CUDA is not available on this machine (use --device cpu or auto)")
    if name in ("auto", "cuda"):  # the process's own GPU (data-parallel ranks each set theirs)
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return name


# ------------------------------------------------------------------------------------------------------------------
# where a model comes from


def gguf_cache_path(name: str) -> Path:
    return cache_root() / "gguf" / embedded(name).file_name


def embedded_model_dir(name: str = "gemma-3-270m") -> Path:
    """The cached bf16 HF folder of an embedded model: assembled from its packages, verified (size, sha256) and
    converted on first use; the assembled GGUF is removed after the conversion (it can be rebuilt from the
    packages). Override the cache with $QTALIGN_CACHE."""
    entry = embedded(name)
    if entry is None:
        raise QtalignError(f"model '{name}': not an embedded model ({', '.join(embedded_names())})")
    out = converted_dir(entry.sha256)
    if (out / "qtalign_source.json").is_file():
        return out
    entry.require_installed()
    gguf = gguf_cache_path(name)
    if not _cached_gguf_ok(gguf, entry):
        entry.assemble(gguf)
    out = ensure_converted(gguf, entry.sha256, name)
    gguf.unlink(missing_ok=True)
    return out


def _cached_gguf_ok(gguf: Path, entry) -> bool:
    """Whether an assembled GGUF left in the cache (by a conversion that was stopped) is the registry's file: size
    and sha256 checked, however right its size. One that is not is qtalign's own leftover: removed, to be assembled
    again from the packages."""
    if not gguf.is_file():
        return False
    try:
        verify_file(gguf, entry.size, entry.sha256, f"model '{entry.name}'")
        return True
    except QtalignError as e:
        print(f"qtalign: {gguf}: {str(e).split(': ', 1)[-1]}; assembling it again from its packages", file=sys.stderr)
    except OSError:  # removed meanwhile by another process's finished conversion
        return False
    gguf.unlink(missing_ok=True)
    return False


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or Path(name).exists() or name.count("/") > 1


def check_model(cfg: ModelConfig) -> None:
    """Everything about a model config that can be checked without loading it (installed packages, paths, the GGUF
    header, the adapter folder, the device): one clear error before any output is written or any weight is read."""
    entry = embedded(cfg.name)
    p = Path(cfg.name).expanduser()
    if entry is not None:
        entry.require_installed()
    elif p.suffix == ".gguf":
        check_gguf(p)
    elif p.exists():
        if not p.is_dir():
            raise QtalignError(f"{p}: a model is a folder, a .gguf file, an embedded name or a hub id")
        if not cfg.gguf_file:
            if not (p / "config.json").is_file():
                raise QtalignError(f"{p}: not a Hugging Face model folder (no config.json)")
            if not any((p / f).is_file() for f in WEIGHT_FILES) and not list(p.glob("*.safetensors")):
                raise QtalignError(f"{p}: the model folder has no weights (model.safetensors / pytorch_model.bin)")
    elif looks_like_path(cfg.name):
        raise QtalignError(f"{p}: model folder not found")
    elif "/" not in cfg.name:
        raise QtalignError(f"model '{cfg.name}': not a local path, not an embedded model ({', '.join(embedded_names())}) "
                           "and not a hub id (owner/name)")
    if cfg.adapter:
        check_adapter_dir(cfg.adapter)
    if cfg.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise QtalignError("load_in_4bit needs CUDA (bitsandbytes NF4); use --dtype bf16 or fp32 on CPU")
    _device(cfg.device)
    if cfg.trust_remote_code and cfg.name not in _WARNED:
        _WARNED.add(cfg.name)
        print(f"qtalign: warning: trust_remote_code is on: Python code shipped with '{cfg.name}' will run on this "
              "machine (set by the config or --trust-remote-code; check where the model comes from)", file=sys.stderr)


_WARNED: set[str] = set()


def warn_slow_bf16(cfg: ModelConfig, device: str) -> None:
    """Once per process, when a bf16 model is loaded onto a CPU without bf16 matrix instructions (said at load time,
    not while checking a config: a config error stays one line)."""
    if device != "cpu" or cfg.dtype != "bf16" or "bf16/cpu" in _WARNED:
        return
    from qtalign.environment import bf16_native

    if bf16_native() is False:
        _WARNED.add("bf16/cpu")
        print("qtalign: warning: this CPU has no bf16 matrix instructions (neither avx512_bf16 nor amx_bf16): "
              "bf16 runs on torch's reference path, about 90x slower than fp32 here (it computes the same "
              "numbers); a long run belongs on a CPU with them, or in fp32 (another model identity: its results "
              "are not shared with bf16 ones)", file=sys.stderr)


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(local path or hub id, GGUF file name inside it or None); embedded models and .gguf files are converted first."""
    check_model(cfg)
    if embedded(cfg.name) is not None:
        return str(embedded_model_dir(cfg.name)), None
    p = Path(cfg.name).expanduser()
    if p.suffix == ".gguf":
        return str(ensure_converted(p.resolve(), file_sha256(p), p.name)), None
    return (str(p), cfg.gguf_file) if p.exists() else (cfg.name, cfg.gguf_file)


def model_identity(cfg: ModelConfig) -> dict:
    """What identifies a model's numbers: content hashes of its weights (and adapter), dtype and quantisation.
    Hashes are cached by path, size and mtime (io.file_sha256), so this is cheap after the first time."""
    entry = embedded(cfg.name)
    p = Path(cfg.name).expanduser()
    if entry is not None:
        ident: dict = {"kind": "embedded", "name": cfg.name, "sha256": entry.sha256, "converter": CONVERTER_VERSION}
    elif p.suffix == ".gguf" and p.is_file():
        ident = {"kind": "gguf", "sha256": file_sha256(p), "converter": CONVERTER_VERSION}
    elif p.is_dir():
        ident = {"kind": "dir", "sha256": dir_sha256(p), "gguf_file": cfg.gguf_file}
    else:
        ident = {"kind": "hub", "id": cfg.name, "revision": _hub_commit(cfg.name, cfg.revision), "gguf_file": cfg.gguf_file}
    ident.update(dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit)
    if cfg.compile:
        ident["compiled"] = True
    if cfg.adapter:
        ident["adapter"] = {"sha256": adapter_sha256(cfg.adapter), "merged": cfg.merge_adapter}
    return ident


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit a hub id resolves to in the local cache (a moving 'main' then still names fixed weights); the
    revision as given when nothing is cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached, no hub library, an odd id: the revision as given
        return revision


# ------------------------------------------------------------------------------------------------------------------
# loading


def context_length(model) -> int | None:
    """The most positions a model was made for (its config's max_position_embeddings, a multimodal model's text
    config's), None when its config does not say."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    return None


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    info: dict


def load_tokenizer(source: str, gguf_file: str | None = None, trust_remote_code: bool = False, revision=None):
    from transformers import AutoTokenizer

    local = Path(source).exists()
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                                            revision=revision, local_files_only=local)
    except (OSError, ValueError) as e:
        raise QtalignError(f"{source}: cannot load its tokenizer: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def adapter_sha256(adapter_dir: str | Path) -> str | None:
    """The identity of a LoRA adapter: its config and its weights (not the README or training arguments beside them)."""
    p = Path(adapter_dir)
    files = [p / "adapter_config.json", *[p / w for w in ADAPTER_WEIGHTS if (p / w).is_file()]]
    if not all(f.is_file() for f in files[:1]):
        return None
    from qtalign.io import text_sha256

    return text_sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files))


ADAPTER_MANIFEST = "qtalign_adapter.json"  # written beside a published adapter: {"sha256": identity, "files": {name: sha256}}


def adapter_manifest(adapter_dir: str | Path) -> dict:
    """The manifest a published adapter carries: each file's sha256 and the adapter's identity (adapter_sha256)."""
    p = Path(adapter_dir)
    names = ["adapter_config.json", *[w for w in ADAPTER_WEIGHTS if (p / w).is_file()]]
    return {"sha256": adapter_sha256(p), "files": {n: file_sha256(p / n) for n in names}}


def check_adapter_dir(adapter_dir: str | Path) -> None:
    """An adapter folder that can be loaded; one that carries a manifest (a published adapter) must match it byte for
    byte."""
    p = Path(adapter_dir)
    if not p.is_dir():
        raise QtalignError(f"{p}: LoRA adapter folder not found")
    if not (p / "adapter_config.json").is_file():
        raise QtalignError(f"{p}: not a LoRA adapter folder (no adapter_config.json)")
    if not any((p / f).is_file() for f in ADAPTER_WEIGHTS):
        raise QtalignError(f"{p}: the adapter folder has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    _check_adapter_weights(next(p / f for f in ADAPTER_WEIGHTS if (p / f).is_file()))
    if (p / ADAPTER_MANIFEST).is_file():
        from qtalign.io import read_json

        want = (read_json(p / ADAPTER_MANIFEST) or {}).get("files") or {}
        if not want:
            raise QtalignError(f"{p / ADAPTER_MANIFEST}: unreadable or lists no files")
        for name, sha in want.items():
            if not (p / name).is_file() or file_sha256(p / name) != sha:
                raise QtalignError(f"{p / name}: does not match the sha256 its manifest {ADAPTER_MANIFEST} records "
                                   "(the published adapter was changed or cut); restore it from the repository")


def _check_adapter_weights(w: Path) -> None:
    """The adapter's weights file is readable as what its name says: a complete safetensors file, or a torch file of
    plain tensors (loaded with weights_only, so a pickle that would run code is refused, never run)."""
    try:
        if w.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(w), framework="pt") as f:  # reads and checks the header against the file's size
                f.keys()
            return
        import torch

        sd = torch.load(w, map_location="cpu", weights_only=True)
        ok = isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
    except Exception as e:  # noqa: BLE001 - safetensors and torch.load raise their own types on a damaged file
        raise QtalignError(f"{w}: not a readable adapter weights file (truncated, damaged or of another format: "
                           f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not ok:
        raise QtalignError(f"{w}: not a state dict of tensors (an adapter's weights)")


def load_model(cfg: ModelConfig | None = None, **overrides) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    cfg = (cfg or ModelConfig()).model_copy(update=overrides)
    dtype = torch_dtype(cfg.dtype)
    device = _device(cfg.device)
    source, gguf = resolve_source(cfg)  # checks the config first (check_model)
    warn_slow_bf16(cfg, device)
    # each tensor straight onto the device (no full copy in host memory first: 8 ranks x a 14B model exhaust a node),
    # or spread over the devices with accelerate
    kw: dict = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
                    local_files_only=Path(source).exists(), device_map=cfg.device_map or device)
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    t0 = time.time()
    if not sys.stderr.isatty():  # a log, not a terminal: no per-tensor loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tok = load_tokenizer(source, gguf, cfg.trust_remote_code, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise QtalignError(f"model '{cfg.name}': cannot load: {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a truncated safetensors file raises the library's own error type
        raise QtalignError(f"model '{cfg.name}': cannot load its weights ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160]})") from None
    if cfg.adapter:
        model = apply_adapter(model, cfg.adapter, merge=cfg.merge_adapter, dtype=dtype)
    model.eval()
    if cfg.compile:
        from qtalign.engine.forward import ModelParts, compile_parts

        compile_parts(ModelParts.of(model))
    info = {
        "name": cfg.name,
        "source": source,
        "identity": model_identity(cfg),
        "adapter": cfg.adapter,
        "merged": bool(cfg.adapter and cfg.merge_adapter),
        "dtype": cfg.dtype,
        "device": device,
        "class": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "load_s": round(time.time() - t0, 2),
    }
    return LoadedModel(model, tok, info)


def apply_adapter(model, adapter_dir: str, merge: bool = False, dtype=None):
    """The base model with a LoRA adapter: unmerged (peft), or merged in fp32 and cast back to ``dtype``."""
    from peft import PeftModel

    check_adapter_dir(adapter_dir)
    if merge and getattr(model, "is_loaded_in_4bit", False):
        raise QtalignError(f"{adapter_dir}: {MERGE_4BIT}")
    try:
        if not merge:
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, local_files_only=True)
        dtype = dtype or next(model.parameters()).dtype
        model = model.float()
        merged = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, local_files_only=True).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise QtalignError(f"{adapter_dir}: this LoRA adapter does not fit the model ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    return merged.to(dtype)


# ------------------------------------------------------------------------------------------------------------------
# one base model, adapters switched


class ModelSet:
    """The base model once in memory and every LoRA adapter compared with it attached unmerged (peft ``load_adapter``),
    instead of a resident copy per model (3 x 28 GB for a 14B base and two adapters). ``load(cfg)`` hands out a
    :class:`LoadedModel` per config (the set's base config with or without an adapter), whose ``model`` is an
    :class:`AdapterView`: every forward of the engine runs inside the view's adapter state (``active``), set on entry
    and restored on exit, also after an exception. Unmerged as a separate load is (merging into bf16 rounds a small
    adapter away), so the scores are those of separately loaded models, bit for bit; the model identities are the
    same. A config that merges its adapter (``merge_adapter``) is a model of its own, loaded apart."""

    _UNKNOWN = object()  # the adapter state while a switch is under way (a failed switch is redone in full)

    def __init__(self, base: ModelConfig):
        self.base_cfg = base.model_copy(update={"adapter": None, "merge_adapter": False})
        self.base: LoadedModel | None = None  # the weights, loaded at the first load()
        self.peft = None  # the PeftModel around base.model once an adapter is attached
        self._names: dict[str, str] = {}  # adapter dir -> its peft adapter name
        self._state = None  # the active adapter's name; None: adapters disabled (the base)
        self._views: dict[str | None, LoadedModel] = {}

    def load(self, cfg: ModelConfig) -> LoadedModel:
        """The model of ``cfg``: this set's base config, with or without an (unmerged) adapter."""
        if cfg.adapter and cfg.merge_adapter:
            return load_model(cfg)  # merged weights are another model
        if cfg.model_copy(update={"adapter": None, "merge_adapter": False}) != self.base_cfg:
            raise ValueError(f"ModelSet of {self.base_cfg.name}: asked for another base model ({cfg.name})")
        if cfg.adapter not in self._views:
            self._views[cfg.adapter] = self._view(cfg)
        return self._views[cfg.adapter]

    def _view(self, cfg: ModelConfig) -> LoadedModel:
        t0 = time.time()
        if self.base is None:
            self.base = load_model(self.base_cfg)
        info = {**self.base.info, "shared_base": True}
        name = None
        if cfg.adapter:
            name = self._attach(cfg.adapter)
            n_adapter = sum(p.numel() for n, p in self.peft.named_parameters() if f".{name}." in n)
            # what a separate load records (load_model), less the base's loading time
            info.update({"identity": model_identity(cfg), "adapter": cfg.adapter, "merged": False,
                         "class": type(self.peft).__name__, "load_s": round(time.time() - t0, 2),
                         "num_parameters": self.base.info["num_parameters"] + n_adapter})
        return LoadedModel(AdapterView(self, name), self.base.tokenizer, info)

    def _attach(self, adapter_dir: str) -> str:
        """Attach an adapter (once per folder) under a name of its own; the first wraps the base model in peft."""
        if adapter_dir in self._names:
            return self._names[adapter_dir]
        from peft import PeftModel

        check_adapter_dir(adapter_dir)
        name = f"qtalign{len(self._names)}"
        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base.model, adapter_dir, adapter_name=name, is_trainable=False,
                                                      local_files_only=True)
                self._state = name  # peft activates the first adapter
            else:
                self.peft.load_adapter(adapter_dir, adapter_name=name, is_trainable=False, local_files_only=True)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise QtalignError(f"{adapter_dir}: this LoRA adapter does not fit the model ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200]})") from None
        self.peft.eval()
        self._names[adapter_dir] = name
        return name

    @contextlib.contextmanager
    def active(self, name: str | None):
        """Forwards inside run with adapter ``name`` (None: the base, adapters disabled); the state before is restored
        on exit, however the block ends."""
        prev = self._state
        self._switch(name)
        try:
            yield
        finally:
            self._switch(prev)

    def _switch(self, name) -> None:
        if self.peft is None or name == self._state:
            return
        self._state = self._UNKNOWN
        if name is None:
            self.peft.base_model.disable_adapter_layers()
        elif name is not self._UNKNOWN:
            self.peft.base_model.enable_adapter_layers()
            self.peft.set_adapter(name)  # (marks its weights trainable: irrelevant, the engine runs in inference mode)
        self._state = name


class AdapterView:
    """One model of a :class:`ModelSet` as the engine sees it: the shared weights in one adapter state (``adapter``
    None: the base). ``engine.forward.ModelParts`` finds ``adapter_context`` and runs every forward inside it; calling
    the view runs the model in its state; other attributes (config, parameters, ...) are the shared model's."""

    def __init__(self, models: ModelSet, adapter: str | None):
        self._models = models
        self.adapter = adapter

    def adapter_context(self):
        return self._models.active(self.adapter)

    def get_base_model(self):
        return self._models.base.model

    def __call__(self, *args, **kwargs):
        with self.adapter_context():
            return self._shared(*args, **kwargs)

    @property
    def _shared(self):
        return self._models.peft if self._models.peft is not None else self._models.base.model

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._shared, name)
