"""Errors moeify raises. Every message says what was wrong and what to do."""


class MoeifyError(Exception):
    """Base class of moeify's own errors."""


class InputError(MoeifyError, ValueError):
    """Bad input from the user: a model, a configuration, a path or a text source."""


class AssetError(MoeifyError, RuntimeError):
    """An asset (model, corpus, task data) could not be fetched or read."""
