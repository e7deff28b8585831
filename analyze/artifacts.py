"""Built libraries saved beside the results, with their fitted heads, and read back.

One ``.npz`` per build (``<results>/libraries/<model>/<library>-K<K>-seed<s>-<protocol>[-s<ratio>].npz``):
``vectors (K, D)``, ``members`` (flat) with ``member_counts (K,)``, ``words``,
``head_weight (R, K, C)``, ``head_bias (R, C)``, ``head_ratios (R,)``, optionally
``head_input_scale (R, 2, K)`` (each head's learnt per-concept ``(γ, β)``), ``activation_mean (K,)`` and ``activation_std (K,)`` (projection libraries),
and a JSON ``meta`` (with the library's ``kind`` and its ``dropped`` concepts). The path is listed in ``concepts.parquet``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from iis.analyze.heads import HeadFit
from iis.analyze.libraries import ConceptLibrary

from iis.store_format import atomic_file, check_name


@dataclass(frozen=True)
class SavedHeads:
    """The interpretable heads of one library build (default protocol: they act on ``g_s(ã)``).

    Attributes:
        weight: ``(R, K, C)`` float32.
        bias: ``(R, C)`` float32.
        ratios: ``(R,)`` the sparsity ratio of each head.
        protocol: ``default``, ``fixed-scale`` or ``reference``.
        input_scale: ``(R, 2, K)`` each head's per-concept ``(γ, β)``, or None (fixed standardisation).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    ratios: np.ndarray
    protocol: str
    input_scale: torch.Tensor | None = None

    def index(self, ratio: float) -> int:
        """The head fitted at ``ratio``; an absent ratio lists the available ones."""
        hits = np.flatnonzero(np.isclose(self.ratios, ratio))
        if not hits.size:
            raise ValueError(f"no head at sparsity {ratio}; fitted: {', '.join(f'{r:g}' for r in self.ratios)}")
        return int(hits[0])

    def _model(self) -> HeadFit:
        return HeadFit(ratios=[float(r) for r in self.ratios], weight=self.weight, bias=self.bias,
                      input_scale=self.input_scale, val_top1=None, test_top1=None, test_top5=None,
                      test_correct=None, test_pred=None, active_concepts=None, best_epoch=None,
                      fit_seconds=0.0, protocol=self.protocol)

    def kept_inputs(self, activations: torch.Tensor, ratio: float) -> torch.Tensor:
        """``g_s(ã)``: ``(N, K)`` activations -> ``(N, K)``, the learnt scale and shift applied and
        ``k(s)`` entries kept per row: what the head's linear layer sees."""
        if self.protocol == "reference":
            raise ValueError("explanations need heads of the default protocol (the reference re-normalises inside)")
        return self._model().head_inputs(activations, self.index(ratio))

    def logits(self, activations: torch.Tensor, ratio: float) -> torch.Tensor:
        """``(N, K)`` activations -> ``(N, C)`` logits of the head at ``ratio``."""
        r = self.index(ratio)
        return self.kept_inputs(activations, ratio) @ self.weight[r] + self.bias[r]


def library_path(library_dir: Path, *, model: str, library: str, num_concepts: int, seed: int,
                 protocol: str, ratio: float | None) -> Path:
    """Where a build is saved; ``ratio`` only for per-ratio libraries (end2end).

    ``model`` and ``library`` become path components, so they must pass :func:`check_name`.
    """
    check_name(model, what="model")
    check_name(library, what="library")
    suffix = f"-s{ratio:g}" if ratio is not None else ""
    return Path(library_dir) / model / f"{library}-K{num_concepts}-seed{seed}-{protocol}{suffix}.npz"


def save_library(lib: ConceptLibrary, fit: HeadFit, *, library_dir: str | None, model: str, seed: int,
                 store: str, num_concepts: int | None = None) -> str | None:
    """Write a library and its heads atomically; returns the path (None without a directory).

    ``num_concepts`` names the file by the requested K (default: the library's own, which a
    filtered text library may have fewer of).
    """
    if library_dir is None:
        return None
    path = library_path(Path(library_dir), model=model, library=lib.name,
                        num_concepts=lib.num_concepts if num_concepts is None else num_concepts,
                        seed=seed, protocol=fit.protocol, ratio=lib.ratio)
    counts = np.array([len(m) for m in lib.members], dtype=np.int64)
    members = np.concatenate(lib.members).astype(np.int64) if len(lib.members) else np.empty(0, np.int64)
    meta = {"name": lib.name, "ratio": lib.ratio, "seed": seed, "store": store,
            "protocol": fit.protocol, "info": lib.info, "kind": lib.kind, "dropped": lib.dropped}
    arrays = dict(vectors=lib.vectors, members=members, member_counts=counts,
                  words=np.array(lib.words or [], dtype=str), head_weight=fit.weight.numpy(),
                  head_bias=fit.bias.numpy(), head_ratios=np.array(fit.ratios, dtype=np.float64),
                  meta=np.array(json.dumps(meta, default=float)))
    if fit.input_scale is not None:
        arrays["head_input_scale"] = fit.input_scale.numpy()
    if lib.mean is not None:
        arrays["activation_mean"] = np.asarray(lib.mean, dtype=np.float32)
    if lib.std is not None:
        arrays["activation_std"] = np.asarray(lib.std, dtype=np.float32)
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return str(path)


def load_library(path: Path) -> tuple[ConceptLibrary, SavedHeads]:
    """Read back what :func:`save_library` wrote."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        bounds = np.cumsum(data["member_counts"])[:-1]
        members = np.split(data["members"], bounds) if len(data["member_counts"]) else []
        words = data["words"].tolist() or None
        # Files written before projection libraries existed hold cosine libraries.
        lib = ConceptLibrary(name=meta["name"], vectors=data["vectors"], members=members,
                             ratio=meta["ratio"], words=words, info=meta.get("info", {}),
                             kind=meta.get("kind", "cosine"),
                             mean=data["activation_mean"] if "activation_mean" in data else None,
                             std=data["activation_std"] if "activation_std" in data else None,
                             dropped=meta.get("dropped", []))
        heads = SavedHeads(weight=torch.from_numpy(data["head_weight"]), bias=torch.from_numpy(data["head_bias"]),
                           ratios=data["head_ratios"], protocol=meta.get("protocol", "default"),
                           input_scale=torch.from_numpy(data["head_input_scale"]) if "head_input_scale" in data
                           else None)
    return lib, heads
