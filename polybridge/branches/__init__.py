"""Branch types: one class per ``branch.type`` a registry entry may name.

A branch type is one module plus one :func:`register_branch` call (the built-in ones are listed in
:mod:`polybridge.catalog`, the one place their names are stated); the ``branch_type`` recorded in a saved
branch's config picks its class on load (:meth:`Branch.from_pretrained`).

>>> from polybridge.branches import get_branch_class
>>> get_branch_class("bdm").__name__
'BDMBranch'
"""

from __future__ import annotations

from polybridge import catalog
from polybridge.branches.base import Branch, BranchError, BranchOutput, load_branch
from polybridge.branches.bdm import BDMBranch
from polybridge.branches.pea import PEABranch

__all__ = ["Branch", "BranchError", "BranchOutput", "BDMBranch", "PEABranch", "load_branch", "register_branch",
           "get_branch_class", "branch_types"]


def register_branch(name: str, cls: type[Branch]) -> None:
    """Make ``cls`` the class of branch type ``name``. Registering one name twice is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Branch)):
        raise TypeError(f"branch type {name!r}: {cls!r} is not a subclass of polybridge.branches.Branch")
    if cls.branch_type != name:
        raise ValueError(f"branch type {name!r}: {cls.__name__}.branch_type is {cls.branch_type!r}; they must agree")
    catalog.register("branch", name, cls)


def get_branch_class(name: str) -> type[Branch]:
    """The class of branch type ``name``; an unknown name lists the valid ones."""
    try:
        return catalog.resolve("branch", name)
    except catalog.UnknownName as exc:
        raise BranchError(str(exc)) from None


def branch_types() -> tuple[str, ...]:
    """The registered branch type names, in registration order."""
    return catalog.names("branch")
