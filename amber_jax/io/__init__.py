"""Model loading: GGUF files, HF safetensors directories, named registry models, orbax cache."""
