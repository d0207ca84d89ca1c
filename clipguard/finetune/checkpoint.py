"""Resumable training state: a small dataclass with ``to_disk`` / ``from_disk``, written atomically.

``<run>/checkpoint.pt`` holds everything a run needs to continue bit-for-bit: the trainable tensors,
optimizer and scheduler state, RNG states (torch CPU/CUDA and the data-order generator; the loop uses no
numpy or Python randomness; under torchrun every rank's, and the number of processes), the data position and
the config hash. ``<run>/checkpoint.json`` repeats
the config and step so ``--resume`` can be checked before any model is loaded. A write that fails (disk full) is a
one-line error and leaves the previous checkpoint intact; a resume removes the temp files a killed write left.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clipguard.distributed import world_size
from clipguard.errors import ClipguardError
from clipguard.finetune.config import FinetuneConfig, config_diff, config_hash, hashed_fields
from clipguard.fsutil import atomic_write, atomic_write_json, remove_stale_temps, writing_output

CHECKPOINT, SUMMARY = "checkpoint.pt", "checkpoint.json"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    epoch: int  # epoch in progress (0-based)
    position: int  # batches of this epoch done
    order: torch.Tensor  # this epoch's image order (int64), drawn from the data generator
    trainable: dict[str, torch.Tensor]  # the parameters that train, by name (CPU)
    optimizer: dict  # AdamW state_dict
    scheduler: dict  # LambdaLR state_dict
    rng: dict[str, object]  # torch CPU state, CUDA states, data-order generator state
    config: dict  # the hashed config fields
    config_hash: str
    loss: float  # last finite training loss
    world_size: int = 1  # processes that trained (torchrun); rng["ranks"] then holds each rank's random state
    # what the run did up to here, over every session: {"images", "wall_s", "losses_first", "losses_last" (ten
    # each)}, so a resumed run's record reports the whole training (None in checkpoints from before it was kept)
    history: dict | None = None

    def to_disk(self, run_dir: str | Path) -> Path:
        d = Path(run_dir)
        with writing_output(d / CHECKPOINT, f"the step-{self.step} checkpoint"):
            path = atomic_write(d / CHECKPOINT, lambda tmp: _save(asdict(self), tmp))
            atomic_write_json(d / SUMMARY, {"step": self.step, "epoch": self.epoch, "position": self.position,
                                            "loss": self.loss, "config_hash": self.config_hash, "config": self.config,
                                            "world_size": self.world_size})
        return path

    @classmethod
    def from_disk(cls, run_dir: str | Path, device: torch.device | str = "cpu") -> TrainState:
        path = Path(run_dir) / CHECKPOINT
        for name in (CHECKPOINT, SUMMARY):  # a run killed mid-write left its temp file: it is litter now
            remove_stale_temps(path.parent / name)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ClipguardError(f"--resume {str(run_dir)!r}: no {CHECKPOINT} there (nothing to resume)") from None
        except Exception as e:  # a torn or foreign file
            raise ClipguardError(f"--resume {str(run_dir)!r}: {CHECKPOINT} cannot be read "
                                 f"({type(e).__name__})") from None
        return cls(**data)


def _save(state: dict, tmp: str) -> None:
    # Into a Python file object: a full disk then surfaces as the file's OSError (behind torch's RuntimeError);
    # torch.save(path) writes from C++ and reports only "unexpected pos".
    with open(tmp, "wb") as f:
        torch.save(state, f)


def capture_rng(data_gen: torch.Generator) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "data": data_gen.get_state()}


def restore_rng(rng: dict, data_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    data_gen.set_state(rng["data"])


def check_resume(run_dir: str | Path, cfg: FinetuneConfig) -> dict:
    """Refuse to resume with a different config (the message names the fields); returns the summary."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ClipguardError(f"--resume {str(run_dir)!r}: no {SUMMARY} there (nothing to resume)") from None
    except json.JSONDecodeError as e:
        raise ClipguardError(f"--resume {str(run_dir)!r}: {SUMMARY} is not valid JSON ({e})") from None
    written_by, here = summary.get("world_size", 1), world_size()
    if written_by != here:
        raise ClipguardError(f"--resume {str(run_dir)!r}: the checkpoint was written by {written_by} process(es), "
                             f"this run has {here}: resume with the same number (torchrun --nproc-per-node "
                             f"{written_by}{'' if written_by > 1 else ', or without torchrun'})")
    if summary.get("config_hash") != config_hash(cfg):
        diff = config_diff(summary.get("config", {}), hashed_fields(cfg))
        raise ClipguardError(f"--resume {str(run_dir)!r}: the checkpoint was made with another config "
                             f"({'; '.join(diff) or 'config hash differs'}): give only --resume DIR (the run keeps "
                             "its own options) or start a new --run-dir")
    return summary
