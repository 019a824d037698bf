"""The one error base class.

Every mistake a user can make (a malformed registry entry, a missing file, a bad argument, a branch built for
another backbone, ...) raises a subclass of :class:`PolyBridgeError` whose message names the file, the key or the
argument and what would be valid. The command line turns a ``PolyBridgeError`` into one line on stderr and exit
status 2; any other exception is a bug in polybridge and shows its traceback.

Subclasses also derive from the built-in exception a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for a missing file, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PolyBridgeError(Exception):
    """A user's mistake, or a state of their files that polybridge cannot work with; the message says which and
    what would be valid."""


class PolyBridgeValueError(PolyBridgeError, ValueError):
    """A value (argument, config key, option) that is not valid."""


class PolyBridgeFileNotFoundError(PolyBridgeError, FileNotFoundError):
    """A file or folder that a command needs and that is not there."""


class PolyBridgeFileExistsError(PolyBridgeError, FileExistsError):
    """An output that is already there and that polybridge will not replace without ``overwrite``."""


class PolyBridgeNotADirectoryError(PolyBridgeError, NotADirectoryError):
    """A path that must be (or lie under) a folder, and is a file."""


class PolyBridgePermissionError(PolyBridgeError, PermissionError):
    """A place the user asked polybridge to write that this process may not write."""


class PolyBridgeOSError(PolyBridgeError, OSError):
    """Weights, a tokenizer or another input that cannot be read as what the registry says it is."""


class PolyBridgeTypeError(PolyBridgeError, TypeError):
    """An argument of the wrong type (a list where a string is expected, ...)."""
