"""The LaTen hypernetwork ("knowledge translator"): maps teacher weight slices to student ones.

One MLP per transferred module, `Linear(d_T, d_T) -> ReLU -> Linear(d_T, d_S)` (no bias, fp32, weights
N(0, 1e-5)), applied to vectors in the teacher's hidden dimension: the rows of up_proj / v_proj and the
columns of down_proj / o_proj (transposed in and back out). With the tiny init the first translations
are ~0, so training starts from the unmodified student. Built in the order of `modules` (LaTen's training
passes the reference's down, up, o, v), so a torch seed gives the reference's initial weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pkt.io import atomic_dir, check_safetensors, fail, read_json, save_tensors, write_json
from pkt.model import COL_MODULES, TRANSFER_MODULES

# COL_MODULES (down/o) are extracted as [n_layers, d, k]: translated along d.
WEIGHTS = "translator.safetensors"
CONFIG = "translator_config.json"


class KnowledgeTranslator(nn.Module):
    def __init__(self, d_T: int, d_S: int, modules=TRANSFER_MODULES, source_model: str = "", target_model: str = "",
                 transfer_rate: float | None = None, init_std: float = 1e-5):
        super().__init__()
        unknown = [m for m in modules if m not in TRANSFER_MODULES]
        if unknown:
            fail(f"unknown module(s) {', '.join(unknown)}: expected some of {', '.join(TRANSFER_MODULES)}")
        self.d_T, self.d_S = int(d_T), int(d_S)
        self.modules_ = list(modules)
        self.source_model, self.target_model, self.transfer_rate = source_model, target_model, transfer_rate
        self.network = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(self.d_T, self.d_T, bias=False, dtype=torch.float32), nn.ReLU(),
                             nn.Linear(self.d_T, self.d_S, bias=False, dtype=torch.float32))
            for m in self.modules_})
        for p in self.network.parameters():
            nn.init.normal_(p, mean=0.0, std=init_std)

    def forward(self, extracted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`extracted[m]`: `[n_layers, k, d_T]` (up/v rows) or `[n_layers, d_T, k]` (down/o columns), any
        dtype -> the same layout with d_S instead of d_T, in fp32 (on the translator's device). The reference
        casts this output to fp16; `pkt.laten.cast_translated` does so under `--dtype fp16`."""
        device = next(self.parameters()).device
        out = {}
        for m in self.modules_:
            x = extracted[m].to(device=device, dtype=torch.float32)
            if m in COL_MODULES:
                out[m] = self.network[m](x.transpose(1, 2)).transpose(1, 2)
            else:
                out[m] = self.network[m](x)
        return out

    def config(self) -> dict:
        return {"d_T": self.d_T, "d_S": self.d_S, "modules": self.modules_, "source_model": self.source_model,
                "target_model": self.target_model, "transfer_rate": self.transfer_rate}

    def save(self, directory) -> None:
        """Write `translator.safetensors` + `translator_config.json` into `directory` (atomically)."""
        with atomic_dir(directory) as tmp:
            self.save_into(tmp)

    def save_into(self, directory) -> None:
        """Same files, written into an existing (e.g. temporary) directory."""
        self.write_files(directory, self.state_dict(), self.config())

    @staticmethod
    def write_files(directory, state: dict, config: dict) -> None:
        """The two files of a translator from its `state_dict` and `config()` (e.g. CPU copies taken earlier:
        LaTen writes checkpoints in a background thread)."""
        save_tensors(Path(directory) / WEIGHTS, state)
        write_json(Path(directory) / CONFIG, config)

    @classmethod
    def load(cls, directory, device=None) -> "KnowledgeTranslator":
        d = Path(directory)
        if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
            fail(f"{directory}: no {WEIGHTS} / {CONFIG} there (not a translator checkpoint)")
        from safetensors.torch import load_file

        cfg = read_json(d / CONFIG, "translator config")
        if not isinstance(cfg, dict) or any(k not in cfg for k in ("d_T", "d_S", "modules")):
            fail(f"translator config {d / CONFIG}: expected the fields d_T, d_S and modules")
        check_safetensors(d / WEIGHTS, "translator")
        t = cls(cfg["d_T"], cfg["d_S"], cfg["modules"], cfg.get("source_model", ""), cfg.get("target_model", ""),
                cfg.get("transfer_rate"))
        t.load_state_dict(load_file(str(d / WEIGHTS)))
        return t.to(device) if device is not None else t
