"""tinygemma's error types: each subclasses the built-in error a caller would catch anyway."""


class TinyGemmaError(Exception):
    """Base of every error tinygemma raises on purpose."""


class CheckpointError(TinyGemmaError, ValueError):
    """A checkpoint (config, safetensors, GGUF) is malformed or disagrees with its config."""


class CheckpointNotFound(TinyGemmaError, FileNotFoundError):
    """A path that should hold a checkpoint or one of its files does not exist."""


class NotEnoughMemory(TinyGemmaError, MemoryError):
    """The weights plus the KV cache asked for would not fit in the machine's memory."""
