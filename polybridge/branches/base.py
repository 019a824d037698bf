"""What every branch type shares: what it records about itself, and how it is saved and loaded.

A branch is a diffusers ``ModelMixin`` + ``ConfigMixin``: its constructor arguments are its config
(``@register_to_config``). On top of that config every branch records what it was built against:

- ``branch_type``: the registered name of its class (``bdm``, ``pea``); picks the class on load;
- ``backbone_fingerprint`` (and ``backbone_architecture``, the UNet config keys the fingerprint hashes,
  so that a mismatch can say which keys differ);
- ``encoder``: ``{"name": <id or path as the registry names it>, "hidden_size": <width of its states>}``;
- ``polybridge_version``.

A saved branch is a folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors``, nothing
else. :meth:`Branch.save_pretrained` writes both into a temporary sibling folder and renames it into
place, so a reader never sees half-written weights. :meth:`Branch.from_pretrained` reads safetensors
only (never a pickle) and, given the backbone's UNet, refuses a branch built for another architecture.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from diffusers import ConfigMixin, ModelMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import polybridge
from polybridge.atomic import atomic_dir
from polybridge.backbones import architecture_config, architecture_diff, architecture_fingerprint, family_of_unet
from polybridge.conditioning import Conditioning
from polybridge.errors import PolyBridgeError, PolyBridgeFileNotFoundError
from polybridge.weights import check_finite

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
#: Keys every saved branch config carries besides its constructor arguments.
RECORD_KEYS: tuple[str, ...] = ("branch_type", "backbone_fingerprint", "backbone_architecture", "encoder",
                                "polybridge_version")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32; with ``sample_weights`` (shape ``[batch]``) the mean of each example's MSE
    times its weight."""
    if sample_weights is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float())
    per_example = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    per_example = per_example.reshape(per_example.shape[0], -1).mean(dim=1)
    return (per_example * sample_weights.to(per_example)).mean()


class BranchError(PolyBridgeError, ValueError):
    """A saved branch cannot be used: unreadable files, wrong type, or built for another backbone."""


class BranchOutput(NamedTuple):
    """What a residual branch adds to the backbone UNet (``down_block_additional_residuals`` and
    ``mid_block_additional_residual``). A plain tuple: ``down, mid = branch(...)`` works."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


class Branch(ModelMixin, ConfigMixin):
    """Base class of every branch type. Subclasses set ``branch_type`` and implement ``from_unet`` and ``forward``."""

    config_name = CONFIG_NAME
    branch_type: ClassVar[str] = ""
    #: Keys a registry entry may set under ``branch.options`` (passed to :meth:`from_unet`).
    option_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether its conditioning depends on the noisy sample and the timestep (then it runs at every denoising step;
    #: otherwise once per call).
    step_dependent: ClassVar[bool] = True
    #: Whether training distils from the backbone fed the English parallel caption (needs an English column).
    distills: ClassVar[bool] = False
    #: What an untrained (zero-initialised) branch of this type does to an image, for the untrained-language warning.
    untrained_effect: ClassVar[str] = "nothing"

    # ------------------------------------------------------------------ what it was built against

    @classmethod
    def from_unet(cls, unet: Any, native_hidden_size: int, encoder_name: str = "", **options: Any) -> Branch:
        raise NotImplementedError

    @classmethod
    def check_options(cls, options: Mapping[str, Any], where: str = "") -> None:
        """Refuse an option this branch type does not take. ``where`` prefixes the option's name in the message
        (``"<file>: branch.options."`` for a registry entry, ``"--branch-option "`` for the command line)."""
        unknown = sorted(set(options) - set(cls.option_keys))
        if unknown:
            raise BranchError(f"{where}{unknown[0]}: unknown option for a {cls.branch_type} branch; valid: "
                              f"{', '.join(cls.option_keys) or '(none)'}")

    # ------------------------------------------------------------------ conditioning

    def condition(self, states: torch.Tensor, mask: torch.Tensor | None = None, *, sample: torch.Tensor | None = None,
                  timestep: Any = None, added: Mapping[str, torch.Tensor] | None = None, scale: float = 1.0,
                  rows: torch.Tensor | None = None, call: Callable[..., Any] | None = None) -> Conditioning:
        """This branch's :class:`~polybridge.conditioning.Conditioning` for native token ``states`` (and their
        ``mask``) on the batch rows ``rows`` (``None``: all). ``sample`` and ``timestep`` are the UNet's inputs of
        those rows (read by :attr:`step_dependent` types); ``added`` is the backbone's added conditioning of those
        rows (SDXL's pooled text and size ids), which a branch that copies the UNet's time embedding reads as the
        UNet does. ``call`` runs the branch's forward (default: the branch itself; the trainer passes the wrapper
        that accelerate / DDP put around it, so that gradients are synchronised)."""
        raise NotImplementedError

    @staticmethod
    def training_loss(unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor,
                      student: Mapping[str, Any], teacher: Mapping[str, Any] | None,
                      weights: Mapping[str, float], sample_weights: torch.Tensor | None = None,
                      parallel: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The training loss: MSE between the UNet's prediction with the branch (``student``: the UNet's keyword
        arguments, :func:`polybridge.conditioning.compose` of the backbone's and the branch's conditioning) and
        ``target``. ``teacher`` (the UNet's inputs for the English parallel caption)
        and ``parallel`` (bool per example: it has a parallel caption; ``None``: all do) are used by branch
        types that distil (:attr:`distills`). ``sample_weights``: one weight per example of the denoising MSE
        (min-SNR; ``None``: all 1). Returns ``{"loss": ..., <parts>: ...}``."""
        pred = unet(noisy, timesteps, **student, return_dict=False)[0]
        loss = weighted_mse(pred, target, sample_weights)
        return {"loss": loss, "denoise": loss.detach()}

    def record(self, unet: Any, encoder_name: str, encoder_hidden_size: int) -> None:
        """Store what this branch is built against in its config (called by ``from_unet``)."""
        self.register_to_config(
            branch_type=self.branch_type,
            backbone_fingerprint=architecture_fingerprint(unet),
            backbone_architecture=architecture_config(unet),
            encoder={"name": str(encoder_name), "hidden_size": int(encoder_hidden_size)},
            polybridge_version=polybridge.__version__,
        )

    def placed_for(self, unet: Any, encoder_name: str, encoder_hidden_size: int) -> Branch:
        """The end of every ``from_unet``: on the UNet's device and dtype, with :meth:`record` done."""
        # nn.Module.to: ModelMixin.to warns about fp32 modules on every dtype cast, even when there are none.
        torch.nn.Module.to(self, device=unet.device, dtype=unet.dtype)
        self.record(unet, encoder_name, encoder_hidden_size)
        return self

    @property
    def backbone_fingerprint(self) -> str | None:
        return self.config.get("backbone_fingerprint")

    @property
    def encoder_name(self) -> str:
        return (self.config.get("encoder") or {}).get("name", "")

    @property
    def encoder_hidden_size(self) -> int | None:
        return (self.config.get("encoder") or {}).get("hidden_size")

    def check_backbone(self, unet: Any, where: str | Path | None = None) -> None:
        """Raise :class:`BranchError` unless this branch was built for ``unet``'s architecture."""
        expected = architecture_fingerprint(unet)
        found = self.backbone_fingerprint
        if found == expected:
            return
        recorded = self.config.get("backbone_architecture") or {}
        diff = architecture_diff(recorded, architecture_config(unet))
        keys = "; ".join(f"{k}: branch {a!r} vs backbone {b!r}" for k, (a, b) in diff.items()) or "(not recorded)"
        built_for, this = family_of_unet(recorded) if recorded else None, family_of_unet(unet)
        families = f" (a branch for an {built_for} backbone on an {this} backbone)" \
            if built_for and this and built_for != this else ""
        raise BranchError(f"{where or 'branch'}: built for a different backbone architecture{families}: expected "
                          f"fingerprint {expected} (this backbone's UNet), found {found}; differing UNet config keys: "
                          f"{keys}")

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = True,
                        torch_dtype: torch.dtype | None = None, **_ignored: Any) -> Path:
        """Write ``config.json`` and the safetensors weights to ``save_directory``, atomically
        (:func:`polybridge.atomic.atomic_dir`: everything goes to a temporary sibling folder, which is
        renamed into place only once complete). An existing folder is replaced unless ``overwrite=False``.
        ``torch_dtype`` stores the floating-point weights in that dtype (``torch.float16`` halves the file);
        :meth:`from_pretrained` loads them as float32 unless told otherwise.
        """
        if not self.backbone_fingerprint:
            raise BranchError(f"{type(self).__name__} has no recorded backbone; build it with from_unet()")
        target = Path(save_directory).expanduser().resolve()
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        config = {"_class_name": type(self).__name__, **_plain(dict(self.config))}
        with atomic_dir(target, overwrite=overwrite) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "branch_type": self.branch_type})
            with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
        return target

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, backbone_unet: Any = None,
                        torch_dtype: torch.dtype | None = None, **_ignored: Any) -> Branch:
        """Load a branch saved by :meth:`save_pretrained`. On the base class the saved ``branch_type``
        picks the class; on a subclass it must match. With ``backbone_unet``, the backbone fingerprint
        must match too. The weights load as float32 whatever dtype they were stored in (as diffusers does),
        or as ``torch_dtype``."""
        folder = Path(directory).expanduser().resolve()
        config = read_branch_config(folder)
        saved_type = config["branch_type"]
        if cls.branch_type:
            if saved_type != cls.branch_type:
                raise BranchError(f"{folder / CONFIG_NAME}: branch_type is {saved_type!r}, "
                                  f"but {cls.__name__} loads {cls.branch_type!r} branches")
            target_cls: type[Branch] = cls
        else:
            from polybridge.branches import get_branch_class

            target_cls = get_branch_class(saved_type)
        weights = folder / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            extra = f" ({', '.join(pickles)} present, but pickle files are never loaded)" if pickles else ""
            raise PolyBridgeFileNotFoundError(f"{weights}: branch weights not found{extra}")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BranchError(f"{weights}: not a readable safetensors file ({exc}); re-save or re-train the branch") from None
        check_finite(state, f"{weights}: branch weights")

        init_keys = set(inspect.signature(target_cls.__init__).parameters) - {"self"}
        init_kwargs = {k: v for k, v in config.items() if k in init_keys}
        unknown = sorted(k for k in config if k not in init_keys and k not in RECORD_KEYS and not k.startswith("_"))
        if unknown:
            raise BranchError(f"{folder / CONFIG_NAME}: unknown key(s) {', '.join(unknown)} for {target_cls.__name__}; "
                              f"valid: {', '.join(sorted(init_keys | set(RECORD_KEYS)))}")
        try:
            from accelerate import init_empty_weights
        except ImportError:  # accelerate is a dependency; without it, build on CPU and overwrite
            branch = target_cls(**init_kwargs)
            assign = False
        else:
            try:
                with init_empty_weights():  # no time spent on random init that the weights overwrite
                    branch = target_cls(**init_kwargs)
            except (TypeError, ValueError, AttributeError, KeyError, ZeroDivisionError) as exc:
                raise BranchError(f"{folder / CONFIG_NAME}: a value does not fit a {saved_type} branch ({exc}); "
                                  "re-save or re-train the branch") from None
            assign = True
        shapes = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
        missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
        wrong_shape = sorted(k for k in set(shapes) & set(state) if tuple(state[k].shape) != shapes[k])
        if missing or unexpected or wrong_shape:
            raise BranchError(f"{weights}: weights do not fit the config in {folder / CONFIG_NAME} (missing: "
                              f"{_few(missing)}; unexpected: {_few(unexpected)}; wrong shape: {_few(wrong_shape)})")
        branch.load_state_dict(state, strict=True, assign=assign)
        branch.register_to_config(**{k: config[k] for k in RECORD_KEYS})
        if backbone_unet is not None:
            branch.check_backbone(backbone_unet, where=folder)
        # ModelMixin.to warns even with no fp32 modules; only floating-point tensors change dtype.
        torch.nn.Module.to(branch, dtype=torch_dtype or torch.float32)
        branch.eval()
        return branch


def load_branch(source: str | Path, backbone_unet: Any = None, torch_dtype: torch.dtype | None = None) -> Branch:
    """A saved branch from a local folder (a ``Path``, as ``LanguageEntry.branch_source`` gives it) or a hub id
    (a ``str``: only its config and safetensors are fetched)."""
    if isinstance(source, str):
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, allow_patterns=["config.json", "*.safetensors"])
    return Branch.from_pretrained(source, backbone_unet=backbone_unet, torch_dtype=torch_dtype)


def read_branch_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a saved branch, checked for the recorded keys."""
    if not folder.is_dir():
        raise PolyBridgeFileNotFoundError(f"{folder}: branch folder not found")
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise PolyBridgeFileNotFoundError(f"{file}: branch config not found")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BranchError(f"{file}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise BranchError(f"{file}: expected a JSON object")
    missing = [k for k in RECORD_KEYS if k not in config]
    if missing:
        raise BranchError(f"{file}: missing recorded key(s) {', '.join(missing)}; "
                          "a branch config records " + ", ".join(RECORD_KEYS))
    return config


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _few(keys: list[str]) -> str:
    return (", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")) if keys else "none"
